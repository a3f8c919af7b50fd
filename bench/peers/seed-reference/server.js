// The seed reference architecture (docs/benchmarks.md): one Node.js endpoint process per core,
// `ws` for the sockets, `ioredis` subscribing to one Redis channel per connected key
// and forwarding every message to that key's sockets as it comes. Publishers do
// `PUBLISH {key} {update frame}` (ringfeed-loadgen pub --redis). It speaks ringfeed's
// `/v1/connect?key=K` and frames, so the same load generator drives it.
//
//   PORT=9101 REDIS=redis://127.0.0.1:6379 node server.js
'use strict';
const { WebSocketServer } = require('ws');
const Redis = require('ioredis');

const port = Number(process.env.PORT || 9101);
const redis = new Redis(process.env.REDIS || 'redis://127.0.0.1:6379');
const sockets = new Map(); // key -> Set<WebSocket>
redis.on('error', (e) => console.error(`redis: ${e.message}`));

redis.on('messageBuffer', (channel, message) => {
  const set = sockets.get(channel.toString());
  if (!set) return;
  for (const ws of set) ws.send(message, { binary: false });
});

const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });
wss.on('connection', (ws, req) => {
  const key = new URL(req.url, 'http://localhost').searchParams.get('key');
  if (!key) {
    ws.close(4400, 'key is missing');
    return;
  }
  let set = sockets.get(key);
  if (!set) {
    set = new Set();
    sockets.set(key, set);
    redis.subscribe(key);
  }
  set.add(ws);
  ws.send(JSON.stringify({ type: 'welcome', key, node: `seed-${port}`, epoch: 'seed', seq: 0 }));
  ws.on('error', () => {});
  ws.on('close', () => {
    set.delete(ws);
    if (set.size === 0 && sockets.get(key) === set) {
      sockets.delete(key);
      redis.unsubscribe(key);
    }
  });
});
wss.on('listening', () => console.log(`seed-reference ready port=${port} pid=${process.pid}`));
