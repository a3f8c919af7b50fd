// The y-websocket server as its package ships it (@y/websocket-server, what the
// `y-websocket` npm package's own server became in v3): its `setupWSConnection` behind
// a `ws` server, as the package's bin/server.js does, on 127.0.0.1 without
// persistence (YPERSISTENCE unset). A P9 peer (docs/benchmarks.md).
//   PORT=9201 node y-websocket-server.mjs
import http from "node:http";
import { WebSocketServer } from "ws";
import { setupWSConnection } from "@y/websocket-server/utils";

const port = Number(process.env.PORT || 9201);
const wss = new WebSocketServer({ noServer: true });
wss.on("connection", setupWSConnection);
const server = http.createServer((_request, response) => {
  response.writeHead(200, { "Content-Type": "text/plain" });
  response.end("okay");
});
server.on("upgrade", (request, socket, head) => {
  wss.handleUpgrade(request, socket, head, (ws) => wss.emit("connection", ws, request));
});
server.listen(port, "127.0.0.1", () => console.log(`y-websocket ready port=${port} pid=${process.pid}`));
