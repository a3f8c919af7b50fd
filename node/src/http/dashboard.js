// ringfeed's dashboard (GET /): draws the cluster from GET /v1/dashboard, a stream of
// Server-Sent Events each carrying one snapshot of the whole cluster, made by the node
// this page came from (it asks its peers). No dependencies, no build step; everything
// shown is set as text, never parsed as HTML.

const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

/** Distinct colours for the first members a page sees (Tableau 10). */
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
  "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
const colours = new Map();

/** A member's colour: the next of the palette the first time the page sees it (so it
 * keeps it while the page is open), then a hue from its id once the palette is used. */
export function colour(id) {
  let c = colours.get(id);
  if (!c) {
    if (colours.size < PALETTE.length) {
      c = PALETTE[colours.size];
    } else {
      let h = 0x811c9dc5;
      for (let i = 0; i < id.length; i++) {
        h ^= id.charCodeAt(i);
        h = Math.imul(h, 0x01000193);
      }
      c = `hsl(${(h >>> 0) % 360} 60% 55%)`;
    }
    colours.set(id, c);
  }
  return c;
}

/** The point at `turn` (0..1, clockwise from the top) on a circle of radius `r`. */
function point(turn, r) {
  const a = turn * 2 * Math.PI - Math.PI / 2;
  return [r * Math.cos(a), r * Math.sin(a)];
}

/** The SVG path of the ring between `from` and `to` (turns), `inner`..`outer` wide. */
export function sector(from, to, inner, outer) {
  if (to - from >= 0.999) {
    // A whole circle cannot be one arc: two halves.
    return sector(from, from + 0.5, inner, outer) + " " + sector(from + 0.5, to, inner, outer);
  }
  const large = to - from > 0.5 ? 1 : 0;
  const [x1, y1] = point(from, outer);
  const [x2, y2] = point(to, outer);
  const [x3, y3] = point(to, inner);
  const [x4, y4] = point(from, inner);
  const f = (n) => n.toFixed(3);
  return `M${f(x1)} ${f(y1)} A${outer} ${outer} 0 ${large} 1 ${f(x2)} ${f(y2)} ` +
    `L${f(x3)} ${f(y3)} A${inner} ${inner} 0 ${large} 0 ${f(x4)} ${f(y4)} Z`;
}

function el(tag, attrs = {}, ...children) {
  const node = tag === "svg" || ["path", "circle", "text", "g", "title"].includes(tag)
    ? document.createElementNS(SVG, tag)
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const number = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
const fmt = (n) => (n === null || n === undefined ? "–" : number.format(n));

function bytes(n) {
  if (!n) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${number.format(n)} ${units[i]}`;
}

function seconds(ms) {
  return ms < 10000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms / 1000)} s`;
}

/** Each active member's exact share of the keys (the node computes it from the ring). */
function shares(snapshot) {
  const out = new Map();
  for (const m of snapshot.members) {
    if (typeof m.share === "number") out.set(m.id, m.share);
  }
  return out;
}

function drawRing(snapshot) {
  const svg = $("ring");
  const parts = [];
  parts.push(el("circle", { r: 100, fill: "none", stroke: "currentColor", "stroke-opacity": 0.12, "stroke-width": 22 }));
  for (const [at, from, to] of snapshot.arcs) {
    const member = snapshot.members[at];
    parts.push(el("path", {
      d: sector(from, to, 89, 111 - 1),
      fill: colour(member.id),
      "data-member": member.id,
    }, el("title", {}, `${member.id}: ${(100 * (to - from)).toFixed(2)} %`)));
  }
  // Inside, each member's share of the keys as one arc: the sum of its thin ones.
  let at = 0;
  for (const [id, share] of [...shares(snapshot)].sort((a, b) => a[0].localeCompare(b[0]))) {
    parts.push(el("path", {
      d: sector(at, at + share, 70, 80),
      fill: colour(id),
      "fill-opacity": 0.85,
      "data-share": id,
    }, el("title", {}, `${id} owns ${(100 * share).toFixed(1)} % of the keys`)));
    at += share;
  }
  const active = snapshot.members.filter((m) => m.state === "active").length;
  parts.push(el("text", { y: -4 }, active === 1 ? "1 active member" : `${active} active members`));
  parts.push(el("text", { y: 10, class: "sub" }, snapshot.arcs.length
    ? `${snapshot.arcs.length} arcs · version ${snapshot.ring_version}`
    : "no active members: nothing is owned"));
  svg.replaceChildren(...parts);
  svg.dataset.ringId = snapshot.ring_id;
}

function stateOf(member) {
  if (!member.reachable) return member.state === "draining" ? "draining" : "unreachable";
  if (member.node_state === "fenced") return "fenced";
  if (member.state === "draining" || member.node_state === "draining") return "draining";
  return "active";
}

function connections(member) {
  if (!member.connections) return "–";
  const parts = Object.entries(member.connections)
    .filter(([, n]) => n > 0)
    .map(([t, n]) => `${t} ${fmt(n)}`);
  return parts.length ? parts.join(" · ") : "0";
}

function drawMembers(snapshot) {
  const share = shares(snapshot);
  const rows = snapshot.members.map((m) => {
    const state = stateOf(m);
    const s = share.get(m.id);
    return el("tr", { "data-member": m.id, "data-state": state },
      el("td", {}, el("span", { class: "swatch", style: `background:${colour(m.id)}` }), m.id),
      el("td", {}, el("span", { class: `state ${state}` }, state)),
      el("td", { title: m.incarnation }, el("code", {}, m.incarnation.slice(0, 8))),
      el("td", { class: "n" }, s === undefined ? "–" : `${(100 * s).toFixed(1)} %`),
      el("td", { class: "n" }, fmt(m.keys)),
      el("td", { class: "n" }, fmt(m.replicas)),
      el("td", { class: "n", title: "by transport" }, connections(m)),
      el("td", { class: "n" }, fmt(m.updates_per_s)),
      el("td", { class: "n" }, bytes(m.resident_bytes)),
    );
  });
  $("members").tBodies[0].replaceChildren(...rows);
}

function drawHot(id, list, figure) {
  const rows = list.map((h) => el("tr", {},
    el("td", { class: "key", title: h.key }, el("code", {}, h.key)),
    el("td", {}, el("span", { class: "swatch", style: `background:${colour(h.node)}` }), h.node),
    el("td", { class: "n" }, fmt(h[figure]))));
  if (!rows.length) rows.push(el("tr", {}, el("td", { class: "empty", colspan: 3 }, "no keys yet")));
  $(id).tBodies[0].replaceChildren(...rows);
}

function drawTransition(t) {
  const box = $("transition");
  if (!t) {
    box.hidden = true;
    delete box.dataset.kind;
    delete box.dataset.node;
    return;
  }
  box.hidden = false;
  const node = t.node ?? "a node";
  box.dataset.kind = t.kind ?? "";
  box.dataset.node = t.node ?? "";
  const what = t.kind === "drain" ? `${node} is draining`
    : t.kind === "join" ? `${node} is joining`
    : `a planned change (${t.kind ?? "unknown"}) by ${node}`;
  const from = t.from_ring_version === undefined ? "" : `, from ring version ${t.from_ring_version}`;
  box.textContent = `${what}: seen open for ${seconds(t.open_ms || 0)}${from}. ` +
    "Keys move with their state and clients.";
}

/** Draws one snapshot (exported for tests and for embedding). */
export function render(snapshot) {
  // Colours go in the members' order, so the first page of a cluster is the same each time.
  for (const m of snapshot.members) colour(m.id);
  $("cluster").textContent = snapshot.cluster;
  $("served-by").textContent = snapshot.node;
  $("ring-version").textContent = snapshot.ring_version;
  $("ring-id").textContent = String(snapshot.ring_id).slice(0, 12);
  $("ring-id").title = snapshot.ring_id;
  $("total-keys").textContent = fmt(snapshot.totals.keys);
  $("total-connections").textContent = fmt(snapshot.totals.connections);
  $("total-rate").textContent = fmt(snapshot.totals.updates_per_s);
  drawRing(snapshot);
  drawMembers(snapshot);
  drawTransition(snapshot.transition);
  drawHot("hot-rate", snapshot.hot.by_rate, "per_s");
  drawHot("hot-subscribers", snapshot.hot.by_subscribers, "subscribers");
  document.body.dataset.ringVersion = snapshot.ring_version;
}

/** How long to wait before opening the stream again after the node refused it. */
const REOPEN_MS = 5000;

/** Follows the node's dashboard stream. EventSource reconnects by itself after a lost
 * connection, but not after an answer other than 200 (503: too many dashboards open
 * on that node): then the stream is opened again a few seconds later. */
export function follow(url = "/v1/dashboard") {
  const status = $("status");
  const source = new EventSource(url);
  source.addEventListener("snapshot", (event) => {
    const snapshot = JSON.parse(event.data);
    render(snapshot);
    status.dataset.state = "live";
    status.textContent = `live · ${new Date().toLocaleTimeString()}`;
  });
  source.addEventListener("error", () => {
    status.dataset.state = "lost";
    if (source.readyState === EventSource.CLOSED) {
      status.textContent = `refused by the node; trying again in ${REOPEN_MS / 1000} s…`;
      setTimeout(() => follow(url), REOPEN_MS);
    } else {
      status.textContent = "connection lost; retrying…";
    }
  });
  return source;
}

if (typeof document !== "undefined" && $("ring")) follow();
