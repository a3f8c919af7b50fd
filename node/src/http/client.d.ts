// TypeScript declarations of ringfeed's browser client (GET /client.js).

export interface Update {
  type: "update";
  key: string;
  seq: number;
  data?: unknown;
  data_b64?: string;
  content_type?: string;
}

export interface Reset {
  type: "reset";
  key: string;
  epoch: string;
  seq: number;
  reason: "history_gap" | "epoch_changed" | "seq_ahead";
}

/** One present connection: the ticket's subject with authentication on, else a
 * per-connection id. */
export interface Member {
  id: string;
}

export interface Presence {
  type: "presence";
  key: string;
  /** The whole list, first. */
  members?: Member[];
  /** Then the changes. */
  joined?: Member[];
  left?: Member[];
}

export interface State {
  state: "open" | "reconnecting" | "closed";
  node?: string;
  transport?: "ws" | "sse";
  code?: number;
  reason?: string;
  retryInMs?: number;
}

export interface Options {
  /** Resume after this seq (its history replayed) rather than at the live end. */
  since?: number;
  /** The epoch `since` belongs to. */
  epoch?: string;
  /** A ticket for the key, when the cluster checks them. */
  ticket?: string;
  /** Ask for the key's presence list and changes (the ticket must allow it). */
  presence?: boolean;
  /** "auto" (WebSocket, else Server-Sent Events), "ws" or "sse". */
  transport?: "auto" | "ws" | "sse";
  onUpdate?: (update: Update) => void;
  onReset?: (reset: Reset) => void;
  onPresence?: (presence: Presence) => void;
  onState?: (state: State) => void;
  /** A final refusal (4400, 4401, 4413): the subscription has stopped. */
  onError?: (error: Error) => void;
}

export interface Subscription {
  /** Publishes `data` on the key over WebSocket; resolves with its seq once replicated. */
  publish(data: unknown): Promise<{ seq: number }>;
  /** The last seq seen and its epoch. */
  readonly position: { seq: number | null; epoch: string | null };
  /** Stops for good. */
  close(): void;
}

/** Follows `key` from any node (`http(s)://host:port`), reconnecting by itself. */
export function subscribe(node: string, key: string, options?: Options): Subscription;
