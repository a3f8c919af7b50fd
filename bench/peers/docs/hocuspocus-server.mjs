// Hocuspocus (@hocuspocus/server 3.x, the last major that runs on Node.js 20; 4.x needs
// Node.js 22) with its default configuration and no extensions: documents in memory,
// nothing stored. A P9 peer (docs/benchmarks.md). Its clients speak Hocuspocus's own
// protocol (every message prefixed with the document's name), so the editors use
// @hocuspocus/provider against it.
//   PORT=9202 node hocuspocus-server.mjs
import { Server } from "@hocuspocus/server";

const port = Number(process.env.PORT || 9202);
const server = new Server({ quiet: true });
// Its own HTTP server, on loopback: Server.listen() would bind every interface (it
// passes `address` where Node.js reads `host`).
server.httpServer.listen(port, "127.0.0.1", () => console.log(`hocuspocus ready port=${port} pid=${process.pid}`));
