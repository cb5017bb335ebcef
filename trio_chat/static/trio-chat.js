// trio-chat.js: a browser client for trio-chat's WebSocket protocol (docs/protocol.md).
//
// An ES module with no dependencies, served by every trio-chat node at
// /static/trio-chat.js. One ChatClient is one member of one room: it reconnects with
// capped, jittered backoff, resumes after the last message it delivered (?since=),
// keeps every frame it sends in an outbox until its ack arrives and sends the outbox
// again after each reconnection (the server stores each client_msg_id once), and
// delivers each room message once, in id order. docs/clients.md describes the API.

const INT64_RE = /^-?(0|[1-9][0-9]{0,18})$/;
const INT64_MIN = -(2n ** 63n);
const INT64_MAX = 2n ** 63n - 1n;
// Refusals that pass: the frame stays in the outbox and goes again shortly.
const TRANSIENT = new Set(["sync_unavailable", "persistence_unavailable", "rate_limited"]);
const CHAT_TYPES = new Set(["chat_txt", "chat_img"]);
const CHANGE_TYPES = new Set(["chat_edit", "chat_delete"]);

const DEFAULTS = {
  backoffFirst: 500,      // ms: the first retry waits between half of this and this
  backoffMax: 10000,      // ms: the cap of the backoff
  stableAfter: 5000,      // ms: a connection open this long resets the backoff
  openTimeout: 10000,     // ms: a handshake not done by then is given up
  ackTimeout: 10000,      // ms: nothing heard while an ack is due: the link has stalled
  retryAfter: 1000,       // ms: a transient refusal is sent again after this
  typingEvery: 2000,      // ms: the server passes on one typing hint per 2 s anyway
  uploadTries: 5,         // an image upload that fails on the network is tried this often
  // Close codes after which reconnecting is pointless: the room was deleted (4003),
  // the member was kicked (4004) or banned (4005).
  finalCloseCodes: [4003, 4004, 4005],
};

/** A refusal by the server (an error frame, an HTTP error) or the client's close. */
export class ChatError extends Error {
  constructor(code, detail) {
    super(`${code}: ${detail}`);
    this.name = "ChatError";
    this.code = code;
    this.detail = detail;
  }
}

/** The canonical decimal string of a 64-bit signed integer, or null. */
export function parseInt64(value) {
  const text = String(value ?? "").trim();
  if (!INT64_RE.test(text)) return null;
  const v = BigInt(text);
  return v < INT64_MIN || v > INT64_MAX ? null : v.toString();
}

/** A fresh client_msg_id: random, so a page reload never reuses one. */
export function newClientMsgId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** JSON.parse that keeps integers beyond 2^53 (64-bit author ids) as decimal strings. */
export function parseFrame(text) {
  return JSON.parse(text, (key, value, context) => {
    if (typeof value === "number" && !Number.isSafeInteger(value) && Number.isInteger(value) &&
        context && typeof context.source === "string" && INT64_RE.test(context.source)) {
      return context.source;
    }
    return value;
  });
}

/** The claims of a JWT, unverified (the server verifies it), or null. */
export function tokenClaims(token) {
  try {
    const part = String(token).split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const bytes = Uint8Array.from(atob(part.padEnd(Math.ceil(part.length / 4) * 4, "=")),
                                  (c) => c.charCodeAt(0));
    const claims = parseFrame(new TextDecoder().decode(bytes));
    return claims !== null && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

/**
 * One member of one room.
 *
 * Events (each a CustomEvent; what it carries is in `event.detail`):
 * - `state`: `{state, attempt, delay, code, reason, resumed, since}`; `state` is
 *   `connecting`, `open`, `reconnecting` (with `delay` in ms until the next try) or
 *   `closed` (with the close `code` and `reason`).
 * - `message`: a `chat_txt` or `chat_img` message, each once, in id order.
 * - `edit`, `delete`: a `chat_edit` / `chat_delete` (apply it to `target_id`).
 * - `ack`: the server's ack of one of ours; `outbox`: the pending list changed.
 * - `typing`: someone else is typing; `presence`: `chat_enter`/`chat_exit`.
 * - `reset`: the server could not resume exactly (`history_reset`); `restarted` is true
 *   when the room's ids went back (its history was reset).
 * - `error`: an error frame that no pending send claimed (a refused send rejects its
 *   promise instead); `other`: a frame of a type
 *   this client does not know.
 */
export class ChatClient extends EventTarget {
  constructor(options = {}) {
    super();
    this.options = { ...DEFAULTS, ...options };
    this.room = parseInt64(options.room);
    if (this.room === null) throw new TypeError("room must be a 64-bit integer");
    this.author = options.author === undefined || options.author === null
      ? null : parseInt64(options.author);
    if (this.author === null && options.author !== undefined && options.author !== null) {
      throw new TypeError("author must be a 64-bit integer");
    }
    this._token = options.token ?? null;
    if (this.author === null && this._token === null) {
      throw new TypeError("give an author or a token");
    }
    this.name = options.name ?? null;
    const base = new URL(options.url ?? "/", globalThis.location?.href);
    this._httpBase = base.origin + base.pathname.replace(/\/+$/, "");
    this._wsBase = (base.protocol === "https:" ? "wss://" : "ws://") + base.host +
      base.pathname.replace(/\/+$/, "");
    this.lastId = options.since === undefined || options.since === null
      ? null : Number(options.since);
    this.state = "idle";
    this._outbox = new Map();  // client_msg_id -> entry, in the order sent
    this._ws = null;
    this._wanted = false;
    this._attempt = 0;
    this._everOpened = false;
    this._openedAt = 0;
    this._generation = 0;
    this._timers = new Set();
    this._retryTimer = null;
    this._stallTimer = null;
    this._lastTyping = 0;
    this._tokenValue = typeof this._token === "string" ? this._token : null;
    this._adoptClaims();
  }

  // ---- public API ----------------------------------------------------------------------

  /** The current WebSocket (for debugging), or null. */
  get socket() { return this._ws; }

  /** Whether frames can go out now (otherwise they wait in the outbox). */
  get connected() { return this._ws !== null && this._ws.readyState === WebSocket.OPEN; }

  /** What waits for an ack: `[{clientMsgId, type, content, targetId, uploading}]`. */
  get outbox() {
    return Array.from(this._outbox.values(), (e) => ({
      clientMsgId: e.cmid, type: e.type, content: e.content, targetId: e.targetId,
      uploading: e.frame === null, label: e.label,
    }));
  }

  /** Start connecting (again, after `close()`); reconnects by itself until `close()`. */
  connect() {
    if (this._wanted) return this;
    this._wanted = true;
    this._attempt = 0;
    this._open();
    return this;
  }

  /** Close for good: pending sends are rejected with ChatError("closed"). */
  close(code = 1000, reason = "client leaving") {
    this._wanted = false;
    this._generation += 1;
    this._clearTimers();
    this._dropSocket(code, reason);
    for (const entry of this._outbox.values()) {
      entry.reject(new ChatError("closed", "the client was closed before the server " +
                                           "acknowledged this message"));
    }
    this._outbox.clear();
    this._emit("outbox", this.outbox);
    this._setState("closed", { code, reason });
  }

  /** Send a text message; resolves with the ack (`{id, durable, ...}`). */
  send(text, { clientMsgId } = {}) {
    if (typeof text !== "string" || text === "") {
      return Promise.reject(new TypeError("a message is a non-empty string"));
    }
    return this._queue("chat_txt", { content: text }, clientMsgId);
  }

  /** Edit one of one's own text messages. */
  edit(targetId, text, { clientMsgId } = {}) {
    return this._queue("chat_edit", { content: text, target_id: targetId }, clientMsgId);
  }

  /** Delete one of one's own messages. */
  delete(targetId, { clientMsgId } = {}) {
    return this._queue("chat_delete", { target_id: targetId }, clientMsgId);
  }

  /**
   * Upload an image (a Blob or File) to the room, then send a `chat_img` naming it:
   * the room gets a reference, never the bytes. Resolves with the ack.
   */
  sendImage(blob, { clientMsgId, label } = {}) {
    const cmid = clientMsgId ?? newClientMsgId();
    const entry = this._entry(cmid, "chat_img", null, null, label ?? blob.name ?? "image");
    this._upload(blob).then((info) => {
      if (!this._outbox.has(cmid)) return;  // closed meanwhile
      entry.content = info.url;
      entry.image = info;
      entry.frame = this._frame("chat_img", { content: info.url }, cmid);
      this._emit("outbox", this.outbox);
      this._transmit(entry);
    }, (error) => {
      if (this._outbox.delete(cmid)) this._emit("outbox", this.outbox);
      entry.reject(error);
    });
    return entry.promise;
  }

  /** Tell the room the author is typing; at most one hint per `typingEvery` ms. */
  typing() {
    const now = Date.now();
    if (!this.connected || now - this._lastTyping < this.options.typingEvery) return false;
    this._lastTyping = now;
    this._ws.send(JSON.stringify({ message_type: "typing" }));
    return true;
  }

  /** Who is online in the room: `{room_id, online, members}` (GET .../members). */
  async members() {
    return this._http("GET", `/rooms/${this.room}/members`);
  }

  /** Older messages: GET /rooms/{room}/messages with the given query parameters. */
  async history(query = {}) {
    return this._http("GET", `/rooms/${this.room}/messages?` + new URLSearchParams(query));
  }

  /** Handle `text` as if the server had sent it (for tests and debugging). */
  handleFrame(text) { this._handle(text); }

  // ---- sending ------------------------------------------------------------------------

  _entry(cmid, type, content, targetId, label) {
    if (this._outbox.has(cmid)) throw new TypeError(`client_msg_id ${cmid} is pending`);
    const entry = { cmid, type, content, targetId, label, frame: null, image: null };
    entry.promise = new Promise((resolve, reject) => {
      entry.resolve = resolve;
      entry.reject = reject;
    });
    this._outbox.set(cmid, entry);
    return entry;
  }

  _queue(type, fields, clientMsgId) {
    if (fields.target_id !== undefined) {
      const target = parseInt64(fields.target_id);
      if (target === null) return Promise.reject(new TypeError("target_id is an integer"));
      fields = { ...fields, target_id: target };
    }
    const cmid = clientMsgId ?? newClientMsgId();
    const entry = this._entry(cmid, type, fields.content ?? null, fields.target_id ?? null,
                              fields.content ?? "");
    entry.frame = this._frame(type, fields, cmid);
    this._emit("outbox", this.outbox);
    this._transmit(entry);
    return entry.promise;
  }

  // Built by hand so 64-bit ids keep every digit (JSON numbers in JS are doubles).
  _frame(type, fields, cmid) {
    let frame = `{"message_type":${JSON.stringify(type)}`;
    if (this._token === null) frame += `,"author_id":${this.author},"room_id":${this.room}`;
    if (fields.target_id !== undefined) frame += `,"target_id":${fields.target_id}`;
    if (fields.content !== undefined) frame += `,"content":${JSON.stringify(fields.content)}`;
    return frame + `,"create_at":${JSON.stringify(new Date().toISOString())}` +
      `,"client_msg_id":${JSON.stringify(cmid)}}`;
  }

  _transmit(entry) {
    if (entry.frame === null || !this.connected) return;
    this._ws.send(entry.frame);
    this._armStall();
  }

  _settle(cmid, value, error) {
    const entry = this._outbox.get(cmid);
    if (entry === undefined) return false;
    this._outbox.delete(cmid);
    if (error) entry.reject(error); else entry.resolve(value);
    this._emit("outbox", this.outbox);
    if (this._outbox.size === 0) this._clearStall();
    return true;
  }

  async _upload(blob) {
    let delay = this.options.backoffFirst;
    for (let tries = 1; ; tries++) {
      let response;
      try {
        const query = this._token === null ? `?author_id=${this.author}` : "";
        response = await fetch(`${this._httpBase}/rooms/${this.room}/images${query}`, {
          method: "POST", body: blob, headers: await this._authHeaders(),
        });
      } catch (error) {  // the network: try again, as a reconnection would
        if (tries >= this.options.uploadTries || !this._wanted) {
          throw new ChatError("upload_failed", String(error.message || error));
        }
        await new Promise((resolve) => this._later(resolve, delay));
        delay = Math.min(this.options.backoffMax, delay * 2);
        continue;
      }
      const body = await response.json().catch(() => ({}));
      if (response.ok) return body;
      if (response.status >= 500 && tries < this.options.uploadTries && this._wanted) {
        await new Promise((resolve) => this._later(resolve, delay));
        delay = Math.min(this.options.backoffMax, delay * 2);
        continue;
      }
      throw new ChatError(body.error ?? `http_${response.status}`,
                          body.detail ?? response.statusText);
    }
  }

  async _http(method, path) {
    const response = await fetch(this._httpBase + path,
                                 { method, headers: await this._authHeaders() });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      throw new ChatError(body.error ?? `http_${response.status}`,
                          body.detail ?? response.statusText);
    }
    return body;
  }

  async _authHeaders() {
    if (this._token === null) return {};
    if (this._tokenValue === null) await this._fetchToken();
    return { authorization: `Bearer ${this._tokenValue}` };
  }

  async _fetchToken() {
    this._tokenValue = String(typeof this._token === "function"
      ? await this._token() : this._token);
    this._adoptClaims();
    return this._tokenValue;
  }

  _adoptClaims() {
    if (this._tokenValue === null) return;
    const claims = tokenClaims(this._tokenValue);
    if (claims === null) return;
    const sub = parseInt64(claims.sub);
    if (sub !== null) this.author = sub;
    if (this.name === null && typeof claims.name === "string" && claims.name) {
      this.name = claims.name;
    }
  }

  // ---- the connection -----------------------------------------------------------------

  async _open() {
    if (this._retryTimer !== null) this._cancel(this._retryTimer);
    this._retryTimer = null;
    this._clearStall();
    this._dropSocket(1000, "reconnecting");
    const generation = ++this._generation;
    this._setState("connecting", { attempt: this._attempt });
    const query = new URLSearchParams();
    try {
      if (this._token !== null) query.set("token", await this._fetchToken());
    } catch (error) {
      if (generation !== this._generation) return;
      this._retry(null, `no token: ${error.message || error}`);
      return;
    }
    if (generation !== this._generation || !this._wanted) return;
    if (this._token === null) query.set("author_id", this.author);
    if (this.lastId !== null) query.set("since", String(this.lastId));
    const since = this.lastId;
    let ws;
    try {
      ws = new WebSocket(`${this._wsBase}/ws/${this.room}?${query}`);
    } catch (error) {
      this._retry(null, String(error.message || error));
      return;
    }
    this._ws = ws;
    const handshake = this._later(() => {
      if (ws === this._ws) this._lost(null, "no handshake within openTimeout");
    }, this.options.openTimeout);
    ws.onopen = () => {
      if (ws !== this._ws) return;
      this._cancel(handshake);
      this._openedAt = Date.now();
      const resumed = this._everOpened;
      this._everOpened = true;
      this._setState("open", { resumed, since, attempt: this._attempt });
      // Whatever was not acknowledged goes again, in order; a message the server
      // already has is acknowledged again without being stored twice.
      for (const entry of this._outbox.values()) this._transmit(entry);
    };
    ws.onmessage = (event) => {
      if (ws !== this._ws) return;
      this._armStall(true);
      this._handle(event.data);
    };
    ws.onclose = (event) => {
      if (ws === this._ws) this._lost(event.code, event.reason);
    };
    ws.onerror = () => { /* onclose follows */ };
  }

  _lost(code, reason) {
    const openFor = this._openedAt ? Date.now() - this._openedAt : 0;
    this._dropSocket(4000, "given up");
    this._clearStall();
    if (!this._wanted) return;
    if (code !== null && this.options.finalCloseCodes.includes(code)) {
      this.close(code, reason);
      return;
    }
    if (openFor >= this.options.stableAfter) this._attempt = 0;
    this._retry(code, reason);
  }

  _retry(code, reason) {
    // Capped exponential backoff with "equal jitter": half fixed, half random.
    const cap = Math.min(this.options.backoffMax,
                         this.options.backoffFirst * 2 ** Math.min(this._attempt, 30));
    const delay = Math.round(cap / 2 + Math.random() * cap / 2);
    this._attempt += 1;
    this._setState("reconnecting", { delay, attempt: this._attempt, code, reason });
    this._retryTimer = this._later(() => { this._retryTimer = null; this._open(); }, delay);
  }

  /** Try now instead of waiting out the backoff (the network or the tab came back). */
  retryNow() {
    if (this._wanted && this._retryTimer !== null) {
      this._attempt = 0;
      this._open();
    }
  }

  // The protocol has no ping a browser can see, so a stalled link (open, but nothing
  // gets through) shows as an ack that does not come: if nothing at all arrives for
  // ackTimeout while a frame waits for its ack, the connection is given up.
  _armStall(heard = false) {
    if (heard || this._stallTimer === null) {
      this._clearStall();
      if (this._outbox.size === 0 || !this.connected) return;
      const waiting = Array.from(this._outbox.values()).some((e) => e.frame !== null);
      if (!waiting) return;
      this._stallTimer = this._later(() => {
        this._stallTimer = null;
        if (this.connected) this._lost(null, "stalled: no answer within ackTimeout");
      }, this.options.ackTimeout);
    }
  }

  _clearStall() {
    if (this._stallTimer !== null) this._cancel(this._stallTimer);
    this._stallTimer = null;
  }

  _dropSocket(code, reason) {
    const ws = this._ws;
    if (ws === null) return;
    this._ws = null;
    this._openedAt = 0;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try { ws.close(code, reason); } catch { /* closing already */ }
  }

  _later(fn, ms) {
    const timer = setTimeout(() => { this._timers.delete(timer); fn(); }, ms);
    this._timers.add(timer);
    return timer;
  }

  _cancel(timer) {
    clearTimeout(timer);
    this._timers.delete(timer);
  }

  _clearTimers() {
    for (const timer of this._timers) clearTimeout(timer);
    this._timers.clear();
    this._retryTimer = this._stallTimer = null;
  }

  _setState(state, detail = {}) {
    this.state = state;
    this._emit("state", { state, ...detail });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  // ---- frames from the server ---------------------------------------------------------

  _handle(text) {
    let frame;
    try {
      frame = parseFrame(text);
    } catch {
      this._emit("other", { message_type: null, raw: String(text).slice(0, 1000) });
      return;
    }
    if (frame === null || typeof frame !== "object" || Array.isArray(frame)) {
      this._emit("other", { message_type: null, raw: String(text).slice(0, 1000) });
      return;
    }
    const type = frame.message_type;
    if (CHAT_TYPES.has(type) || CHANGE_TYPES.has(type)) {
      const cmid = frame.client_msg_id;
      if (cmid !== undefined && this._outbox.has(cmid) &&
          (this.author === null || String(frame.author_id) === this.author)) {
        this._settle(cmid, { message_type: "ack", client_msg_id: cmid, id: frame.id,
                             room_id: frame.room_id, received_at: frame.received_at });
      }
      if (typeof frame.id !== "number") return;
      if (this.lastId !== null && frame.id <= this.lastId) return;  // replayed, shown
      this.lastId = frame.id;
      frame.mine = this.author !== null && String(frame.author_id) === this.author;
      const event = CHAT_TYPES.has(type) ? "message"
        : type === "chat_edit" ? "edit" : "delete";
      this._emit(event, frame);
    } else if (type === "ack") {
      if (this._settle(frame.client_msg_id, frame)) this._emit("ack", frame);
    } else if (type === "error") {
      const entry = this._outbox.get(frame.client_msg_id);
      if (entry !== undefined && TRANSIENT.has(frame.code)) {
        this._later(() => {
          if (this._outbox.get(entry.cmid) === entry) this._transmit(entry);
        }, this.options.retryAfter);
        return;
      }
      if (entry !== undefined) {  // the send's promise carries it
        this._settle(entry.cmid, null, new ChatError(frame.code, frame.detail));
        return;
      }
      this._emit("error", frame);
    } else if (type === "typing") {
      if (this.author === null || String(frame.author_id) !== this.author) {
        this._emit("typing", frame);
      }
    } else if (type === "chat_enter" || type === "chat_exit") {
      this._emit("presence", { ...frame, event: type === "chat_enter" ? "enter" : "exit" });
    } else if (type === "history_reset") {
      // What follows is the room's recent history, whatever its ids.
      const restarted = typeof frame.latest_id === "number" &&
        typeof frame.since === "number" && frame.latest_id < frame.since;
      this.lastId = null;
      this._emit("reset", { ...frame, restarted });
    } else {
      this._emit("other", frame);
    }
  }
}

/** `new ChatClient(options).connect()`. */
export function connect(options) {
  return new ChatClient(options).connect();
}
