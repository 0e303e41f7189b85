// The y-websocket reference server: @y/websocket-server's setupWSConnection (what its own server.js runs) on
// an http server with npm `ws`. `node server.mjs none|deflate` listens on 127.0.0.1, a free port, prints
// {"port": N} and serves until stdin closes. The stock server.js leaves ws's perMessageDeflate at its
// default (false); this one sets it from the argument so both settings can be measured.
import http from 'node:http'
import { WebSocketServer } from 'ws'
import { setupWSConnection } from '@y/websocket-server/utils'

const compress = process.argv[2] === 'deflate'
const wss = new WebSocketServer({ noServer: true, perMessageDeflate: compress })
const server = http.createServer((_request, response) => {
  response.writeHead(200, { 'Content-Type': 'text/plain' })
  response.end('okay')
})
wss.on('connection', (conn, request) => setupWSConnection(conn, request))
server.on('upgrade', (request, socket, head) => {
  wss.handleUpgrade(request, socket, head, (conn) => wss.emit('connection', conn, request))
})
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n')
})
process.stdin.on('end', () => process.exit(0))
process.stdin.on('close', () => process.exit(0))
process.stdin.resume()
