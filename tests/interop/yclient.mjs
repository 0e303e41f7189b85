// A stock Yjs client (yjs + y-websocket + ws, from npm) syncing one crdtmail shard over the plain
// y-websocket endpoint. Usage: node yclient.mjs WS_URL ROOM TOKEN FLAG_KEY
// Prints the message ids it received, after setting FLAG_KEY to true in the shard's "flags" map.
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'

const [url, room, token, flagKey] = process.argv.slice(2)
const doc = new Y.Doc()
const provider = new WebsocketProvider(url, room, doc, {
  WebSocketPolyfill: WebSocket,
  params: { token },
  disableBc: true,
  connect: true
})
const timer = setTimeout(() => {
  console.error('no sync within 20 s')
  process.exit(2)
}, 20000)
provider.on('sync', (synced) => {
  if (!synced) return
  const ids = [...doc.getMap('messages').keys()].sort()
  doc.getMap('flags').set(flagKey, true)
  // y-websocket sends the update at once; give it a moment on the wire before leaving.
  setTimeout(() => {
    console.log(JSON.stringify({ ids }))
    clearTimeout(timer)
    provider.destroy()
    process.exit(0)
  }, 500)
})
