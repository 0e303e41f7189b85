// The y-websocket stack's client: yjs documents joined to rooms through y-websocket's WebsocketProvider,
// with npm `ws` as its WebSocket. `node client.mjs none|deflate` answers one JSON command per stdin line
// with one JSON line on stdout (the same protocol as bench/alternatives/pyws_child.py); it exits when stdin
// closes. Times are process.hrtime (CLOCK_MONOTONIC on Linux, the clock Python's time.monotonic_ns reads).
import { createInterface } from 'node:readline'
import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'

const compress = process.argv[2] === 'deflate'
const require = createRequire(import.meta.url)

// WebsocketProvider constructs `new WS(url, protocols)`: pass ws's permessage-deflate option through.
class BenchWebSocket extends WebSocket {
  constructor (url, protocols) {
    super(url, protocols, { perMessageDeflate: compress })
  }
}

const rooms = new Map() // room -> { doc, provider }
const received = new Map() // key -> hrtime ns when this client observed it
let arrived = null

const now = () => Number(process.hrtime.bigint())
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

function connect (url, room, doc) {
  return new WebsocketProvider(url, room, doc, { WebSocketPolyfill: BenchWebSocket, disableBc: true })
}

function whenSynced (provider, seconds) {
  return new Promise((resolve, reject) => {
    if (provider.synced) return resolve()
    const timer = setTimeout(() => reject(new Error(`not synced after ${seconds} s`)), seconds * 1000)
    provider.on('sync', (state) => { if (state) { clearTimeout(timer); resolve() } })
  })
}

async function join ({ url, room, load, observe }) {
  const doc = new Y.Doc()
  if (load) Y.applyUpdate(doc, readFileSync(load))
  if (observe) {
    doc.getMap('flags').observe((event) => {
      const t = now()
      for (const key of event.keysChanged) received.set(key, t)
      if (arrived) arrived()
    })
  }
  const provider = connect(url, room, doc)
  await whenSynced(provider, 60)
  rooms.set(room, { doc, provider })
  return { extensions: provider.ws ? provider.ws.extensions : '', entries: doc.getMap('messages').size }
}

async function setKeys ({ room, keys, interval_ms: interval }) {
  const flags = rooms.get(room).doc.getMap('flags')
  const times = []
  for (const key of keys) {
    times.push(now())
    flags.set(key, true)
    await sleep(interval)
  }
  return { times }
}

async function take ({ keys, timeout }) {
  const deadline = Date.now() + timeout * 1000
  while (!keys.every((key) => received.has(key)) && Date.now() < deadline) {
    await new Promise((resolve) => {
      arrived = resolve
      setTimeout(resolve, 50)
    })
    arrived = null
  }
  const times = keys.map((key) => (received.has(key) ? received.get(key) : null))
  for (const key of keys) received.delete(key)
  return { times }
}

async function sync ({ url, room, expect }) {
  const doc = new Y.Doc()
  const messages = doc.getMap('messages')
  const started = process.hrtime.bigint()
  const provider = connect(url, room, doc)
  const ws = provider.ws
  let payload = 0
  ws.addEventListener('message', (event) => { payload += event.data.byteLength })
  try {
    await whenSynced(provider, 120)
    const limit = Date.now() + 120000
    while (messages.size < expect && Date.now() < limit) await sleep(1)
    const seconds = Number(process.hrtime.bigint() - started) / 1e9
    const entries = messages.size
    await sleep(100) // as the Python client: let what follows the sync go out before counting bytes
    const socket = ws._socket
    return {
      seconds,
      entries,
      payload_bytes_received: payload,
      wire_bytes_received: socket ? socket.bytesRead : null,
      wire_bytes_sent: socket ? socket.bytesWritten : null,
      extensions: ws.extensions
    }
  } finally {
    provider.destroy()
    doc.destroy()
  }
}

function versions () {
  const out = { node: process.version }
  for (const name of ['yjs', 'y-websocket', 'ws', '@y/websocket-server', 'y-protocols', 'lib0']) {
    try {
      // the package.json of each package, found the way Node resolves it from this directory
      out[name] = JSON.parse(readFileSync(require.resolve(`${name}/package.json`), 'utf8')).version
    } catch (e) {
      out[name] = null
    }
  }
  return out
}

async function handle (command) {
  switch (command.cmd) {
    case 'join': return join(command)
    case 'set': return setKeys(command)
    case 'take': return take(command)
    case 'sync': return sync(command)
    case 'versions': return versions()
    case 'quit':
      for (const { doc, provider } of rooms.values()) { provider.destroy(); doc.destroy() }
      rooms.clear()
      return {}
    default: throw new Error(`unknown command ${command.cmd}`)
  }
}

const lines = createInterface({ input: process.stdin })
let queue = Promise.resolve()
lines.on('line', (line) => {
  if (!line.trim()) return
  queue = queue.then(async () => {
    const command = JSON.parse(line)
    let reply
    try {
      reply = await handle(command)
    } catch (e) {
      reply = { error: String(e && e.stack ? e.stack : e) }
    }
    process.stdout.write(JSON.stringify(reply) + '\n')
    if (command.cmd === 'quit') process.exit(0)
  })
})
lines.on('close', () => process.exit(0))
