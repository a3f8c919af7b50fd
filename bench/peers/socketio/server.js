// Socket.IO with @socket.io/redis-adapter (docs/benchmarks.md's second peer): one Node.js
// process per core, every client in the room of its key, broadcasts through the
// adapter's Redis pub/sub. It is the stack as teams deploy it — default Socket.IO
// server options, WebSocket transport — with no handicaps.
//
// Clients connect with `ws://HOST:PORT/socket.io/?EIO=4&transport=websocket&key=K`,
// send the namespace CONNECT (`40`) and join room K. Publishers emit to a room the
// way `@socket.io/redis-emitter` does: `PUBLISH socket.io#/#K# <msgpack [uid, packet,
// opts]>` (ringfeed-loadgen pub --redis … --socketio), with packet
// `{type: 2, data: ["update", frame], nsp: "/"}`; each client receives
// `42["update",{…frame…}]`.
//
//   PORT=9201 REDIS=redis://127.0.0.1:6379 node server.js
'use strict';
const http = require('http');
const { Server } = require('socket.io');
const { createAdapter } = require('@socket.io/redis-adapter');
const Redis = require('ioredis');

const port = Number(process.env.PORT || 9201);
const pub = new Redis(process.env.REDIS || 'redis://127.0.0.1:6379');
const sub = pub.duplicate();
for (const c of [pub, sub]) c.on('error', (e) => console.error(`redis: ${e.message}`));

const server = http.createServer();
const io = new Server(server, {
  transports: ['websocket'],
  perMessageDeflate: false,
  adapter: createAdapter(pub, sub),
});
io.on('connection', (socket) => {
  const key = socket.handshake.query.key;
  if (typeof key !== 'string' || key === '') {
    socket.disconnect(true);
    return;
  }
  socket.join(key);
});
server.listen(port, '127.0.0.1', () =>
  console.log(`socketio ready port=${port} pid=${process.pid}`));
