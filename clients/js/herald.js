// herald.js: the browser client for Herald's `GET /events` stream.
// One ES module, no dependencies, no build step; every Herald node serves it
// as `/herald.js`. Types: herald.d.ts next to this file.
//
//   import { Herald } from '/herald.js';
//   const herald = new Herald({ topics: ['news'], share: true, refresh: renewCookie });
//   herald.on('notice', (data, meta) => show(data, meta.channel));
//
// What it adds to a bare EventSource:
//
// - It never gives up. EventSource closes for good on any non-200 answer;
//   this client closes its EventSource on every error and opens a new one
//   after a jittered exponential backoff (about 0.5 s, doubling to 30 s).
//   On a 401, or when the node sends `herald.expired`, it first awaits the
//   application's `refresh()` (which renews the cookie). It waits while the
//   browser says it is offline and reconnects at once when it is back.
//
// - It resumes across page loads. Every message carries a cursor (`id:`);
//   the newest one is kept in sessionStorage or localStorage (`persist`) and
//   a new EventSource, which cannot set `Last-Event-ID`, passes it as
//   `?last_event_id=`: the node replays what the page missed.
//
// - How sharing works (`share: true`). Tabs of one origin that ask for the
//   same stream (same URL and topics) form a group:
//     * Leader: every tab requests the same Web Lock. The tab holding it is
//       the leader and alone opens the EventSource; the others wait in the
//       lock's queue and never connect. A tab that closes (or freezes)
//       releases the lock, and the browser grants it to the next tab at once.
//     * Fan-out: the leader posts every event on a BroadcastChannel; every
//       tab (the leader included) dispatches it to its own handlers.
//     * Cursor: every tab merges the cursor of every event it sees, and the
//       leader answers each newcomer's `hello` with its own, so whichever
//       tab leads next resumes from the newest position any tab saw.
//     * No event twice: a message's identity is (channel, stream id), read
//       from the cursor (below). Each tab remembers the identities it showed
//       lately and drops a replayed copy after a handover.
//     * A tab that joins (or reloads) while another leads shows new events
//       only: the leader does not replay for it.
//   Without Web Locks or BroadcastChannel every tab holds its own stream.
//
// The cursor is `v1.` + base64url(JSON {channel: "ms-seq"}) (Herald's
// src/sse.rs). Applications treat it as opaque; this file ships with the
// server, so it may read it: to merge positions from several tabs and to
// tell which channel a message advanced. A cursor in any other format is
// still passed back as is, and deduplicated by its exact text.

/** First reconnect delay (ms), before jitter. */
export const MIN_DELAY_MS = 500;
/** Longest reconnect delay (ms). */
export const MAX_DELAY_MS = 30_000;
/** How many message identities a tab remembers to drop replayed copies. */
export const RECENT_LIMIT = 4096;

/** Control events every connection listens to, whatever the app asked for. */
const CONTROL_EVENTS = ['herald.ready', 'herald.reset', 'herald.expired', 'herald.disconnected'];

// ---------------------------------------------------------------------------
// Pure parts (exported for the unit tests in test/)
// ---------------------------------------------------------------------------

/**
 * Delay before reconnect number `attempt` (0-based): 0.5 s doubling up to
 * 30 s, each scaled by a random factor in [0.5, 1.5) so that clients cut off
 * together (a node died) do not come back together, capped at 30 s.
 */
export function backoffDelay(attempt, random = Math.random) {
  const exponent = Math.min(Math.max(0, attempt), 16);
  const base = Math.min(MAX_DELAY_MS, MIN_DELAY_MS * 2 ** exponent);
  return Math.min(MAX_DELAY_MS, Math.round(base * (0.5 + random())));
}

/**
 * The connection state machine. States: 'connecting' (first attempt),
 * 'open' (caught up: `herald.ready` arrived), 'reconnecting' (lost, waiting
 * or trying again), 'closed' (by `close()`, final). Inputs: 'ready',
 * 'error', 'offline', 'leader-gone', 'close'.
 */
export function transition(state, input) {
  if (state === 'closed' || input === 'close') return 'closed';
  switch (input) {
    case 'ready':
      return 'open';
    case 'error':
    case 'offline':
    case 'leader-gone':
      return 'reconnecting';
    default:
      return state;
  }
}

function base64urlDecode(text) {
  const b64 = text.replace(/-/g, '+').replace(/_/g, '/');
  const binary = atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4));
  return new TextDecoder().decode(Uint8Array.from(binary, (c) => c.charCodeAt(0)));
}

function base64urlEncode(text) {
  let binary = '';
  for (const byte of new TextEncoder().encode(text)) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

const STREAM_ID = /^(0|[1-9][0-9]*)-(0|[1-9][0-9]*)$/;

/** A v1 cursor as a Map channel → stream id, or null for any other text. */
export function decodeCursor(text) {
  if (typeof text !== 'string' || !text.startsWith('v1.')) return null;
  try {
    const object = JSON.parse(base64urlDecode(text.slice(3)));
    if (!object || typeof object !== 'object' || Array.isArray(object)) return null;
    const positions = new Map();
    for (const [channel, id] of Object.entries(object)) {
      if (typeof id !== 'string' || !STREAM_ID.test(id)) return null;
      positions.set(channel, id);
    }
    return positions;
  } catch (_) {
    return null;
  }
}

/** The v1 cursor text for a Map channel → stream id. */
export function encodeCursor(positions) {
  return 'v1.' + base64urlEncode(JSON.stringify(Object.fromEntries(positions)));
}

/** Compares two stream ids `ms-seq` (non-negative integers of any size). */
export function compareStreamIds(a, b) {
  const [am, as] = a.split('-');
  const [bm, bs] = b.split('-');
  const digits = (x, y) => x.length - y.length || (x < y ? -1 : x > y ? 1 : 0);
  return digits(am, bm) || digits(as, bs);
}

/**
 * The newest position of every channel in either cursor. When one of them is
 * not a v1 cursor, the other (`next` if both are not) wins as is.
 */
export function mergeCursors(current, next) {
  if (!next) return current ?? null;
  if (!current) return next;
  const a = decodeCursor(current);
  const b = decodeCursor(next);
  if (!a || !b) return b ? next : a ? current : next;
  const merged = new Map(a);
  for (const [channel, id] of b) {
    const had = merged.get(channel);
    if (had === undefined || compareStreamIds(id, had) > 0) merged.set(channel, id);
  }
  return encodeCursor(merged);
}

/**
 * What a frame with cursor `id` delivered on a connection whose previous
 * cursor was `previous`: the `[channel, streamId]` positions it advanced.
 * A message moves one channel; right after a resume the node may also have
 * moved channels it could not replay to their tip, so there can be more.
 * Empty when the cursor did not change: a message published without a
 * stream id (live only, never replayed, so never a duplicate).
 */
export function advancedPositions(previous, id) {
  if (!id || id === previous) return [];
  const before = decodeCursor(previous);
  const after = decodeCursor(id);
  if (!after) return [[null, id]];
  const moved = [];
  for (const [channel, position] of after) {
    const had = before?.get(channel);
    if (had === undefined || compareStreamIds(position, had) > 0) moved.push([channel, position]);
  }
  return moved.length ? moved : [[null, id]];
}

/** A bounded set of the message identities a tab showed most recently. */
export class RecentSet {
  constructor(limit = RECENT_LIMIT) {
    this.limit = limit;
    this.keys = new Set();
  }

  has(key) {
    return this.keys.has(key);
  }

  add(key) {
    this.keys.delete(key);
    this.keys.add(key);
    while (this.keys.size > this.limit) this.keys.delete(this.keys.values().next().value);
  }

  /**
   * Decides about a message that advanced `positions` (see
   * advancedPositions): `null` when every one of them was shown already (a
   * copy replayed after a handover), else `{ channel }` — the channel when
   * exactly one position is new — and remembers them. A message that
   * advanced nothing (published without a stream id) is always new.
   */
  admit(positions) {
    const keys = positions.map(([channel, id]) => `${channel}\n${id}`);
    const fresh = positions.filter((_, i) => !this.has(keys[i]));
    if (keys.length > 0 && fresh.length === 0) return null;
    for (const key of keys) this.add(key);
    const channel = fresh.length === 1 && typeof fresh[0][0] === 'string' ? fresh[0][0] : undefined;
    return { channel };
  }
}

/**
 * Where the cursor survives a reload: a Storage (sessionStorage,
 * localStorage) or nothing. Storage that throws (private mode, a sandboxed
 * frame, quota) behaves as nothing.
 */
export class CursorStore {
  constructor(storage, key) {
    this.storage = storage ?? null;
    this.key = key;
  }

  load() {
    try {
      return this.storage?.getItem(this.key) ?? null;
    } catch (_) {
      return null;
    }
  }

  save(cursor) {
    if (!cursor) return;
    try {
      this.storage?.setItem(this.key, cursor);
    } catch (_) {
      // Not persisted; the stream itself is unaffected.
    }
  }
}

/** The Storage `persist` names, or null ('none', or none available). */
export function storageFor(persist, scope = globalThis) {
  try {
    if (persist === 'local') return scope.localStorage ?? null;
    if (persist === 'session') return scope.sessionStorage ?? null;
  } catch (_) {
    // Access itself can throw (storage disabled).
  }
  return null;
}

/** `data` as the app gets it: JSON-parsed when it is JSON, else the text. */
export function parseData(text) {
  try {
    return JSON.parse(text);
  } catch (_) {
    return text;
  }
}

/** The stream URL with topics and, when known, the resume cursor. */
export function streamUrl(url, topics, cursor, base) {
  const target = new URL(url, base);
  for (const topic of topics) target.searchParams.append('topic', topic);
  if (cursor) target.searchParams.set('last_event_id', cursor);
  return target.href;
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

export class Herald {
  /**
   * @param {object} [options]
   * @param {string} [options.url='/events'] the stream; absolute for another origin
   * @param {string[]} [options.topics=[]] `?topic=` for each
   * @param {boolean} [options.share=false] one connection for every tab of this origin
   * @param {'session'|'local'|'none'} [options.persist='session'] where the cursor survives a reload
   * @param {() => Promise<void>} [options.refresh] renews the cookie (on 401 and herald.expired)
   * @param {boolean} [options.withCredentials=true] send cookies to another origin
   */
  constructor(options = {}) {
    this.url = options.url ?? '/events';
    this.topics = [...(options.topics ?? [])];
    this.refresh = options.refresh ?? null;
    this.withCredentials = options.withCredentials ?? true;
    /** Called with the new state on every change. */
    this.onstate = null;
    /** Called with `true`/`false` when this tab starts or stops leading. */
    this.onleader = null;

    const base = globalThis.location?.href;
    this._streamBase = base;
    // Tabs share a stream only when they ask for the same one.
    const group = 'herald:' + streamUrl(this.url, [...this.topics].sort(), null, base);
    this._store = new CursorStore(storageFor(options.persist ?? 'session'), group + ':cursor');
    this._cursor = this._store.load();
    this._recent = new RecentSet();
    this._handlers = new Map();
    // Every event name any tab of the group listens to: a leader must
    // listen for its followers too (EventSource dispatches by name).
    this._names = new Set(['message']);
    this._state = 'connecting';
    this._leader = false;
    this._closed = false;
    this._attempt = 0;
    this._source = null;
    this._sourceCursor = null;
    this._timer = null;
    this._renewing = false;

    this._onOnline = () => this._online();
    this._onOffline = () => this._offline();
    this._onFreeze = () => this._withdraw();
    this._onResume = () => this._rejoin();
    globalThis.addEventListener?.('online', this._onOnline);
    globalThis.addEventListener?.('offline', this._onOffline);

    const canShare = typeof BroadcastChannel === 'function' && globalThis.navigator?.locks;
    if (options.share && canShare) {
      this._joinGroup(group);
    } else {
      this._lead();
    }
  }

  /** The connection state: 'connecting' | 'open' | 'reconnecting' | 'closed'. */
  get state() {
    return this._state;
  }

  /** Whether this tab holds the connection (always, without `share`). */
  get leader() {
    return this._leader;
  }

  /** The newest cursor this tab saw (what a resume would send). */
  get cursor() {
    return this._cursor;
  }

  /**
   * Calls `handler(data, meta)` for every `event` (`'message'` for events
   * without a name); returns a function that removes it.
   */
  on(event, handler) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(handler);
    if (!this._names.has(event) && !CONTROL_EVENTS.includes(event)) {
      this._names.add(event);
      this._listen(this._source, event);
      this._post({ t: 'names', names: [event] });
    }
    return () => this.off(event, handler);
  }

  off(event, handler) {
    this._handlers.get(event)?.delete(handler);
  }

  /** Ends the stream for good and lets another tab lead. */
  close() {
    if (this._closed) return;
    this._closed = true;
    this._disconnect();
    if (this._leader) this._post({ t: 'leaving' });
    this._setLeader(false);
    this._lockAbort?.abort();
    this._releaseLock?.();
    this._channel?.close();
    globalThis.removeEventListener?.('online', this._onOnline);
    globalThis.removeEventListener?.('offline', this._onOffline);
    globalThis.document?.removeEventListener?.('freeze', this._onFreeze);
    globalThis.document?.removeEventListener?.('resume', this._onResume);
    this._setState(transition(this._state, 'close'));
  }

  // --- sharing ------------------------------------------------------------

  _joinGroup(group) {
    this._channel = new BroadcastChannel(group);
    this._channel.onmessage = (e) => this._onGroupMessage(e.data);
    this._lockName = group;
    // A frozen tab runs no tasks: as leader it could not forward events,
    // and granted the lock while frozen it would hold it and do nothing. So
    // on `freeze` it leaves the queue (handing the lead on) and on `resume`
    // it queues again.
    globalThis.document?.addEventListener?.('freeze', this._onFreeze);
    globalThis.document?.addEventListener?.('resume', this._onResume);
    this._requestLock();
    this._post({ t: 'hello', names: [...this._names] });
  }

  _requestLock() {
    this._lockAbort = new AbortController();
    navigator.locks
      .request(this._lockName, { signal: this._lockAbort.signal }, () => {
        if (this._closed) return undefined;
        this._lead();
        // Held until this promise settles: on close(), freeze or unload.
        return new Promise((resolve) => {
          this._releaseLock = resolve;
        });
      })
      .catch(() => {
        // AbortError: close() or `freeze` withdrew the request.
      });
  }

  /** Leaves the lock's queue, or the lead, until `_rejoin`. */
  _withdraw() {
    if (this._closed || !this._lockAbort) return;
    const wasLeader = this._leader;
    this._disconnect();
    this._setLeader(false);
    this._lockAbort.abort();
    this._lockAbort = null;
    this._releaseLock?.();
    this._releaseLock = null;
    if (wasLeader) this._post({ t: 'leaving' });
  }

  _rejoin() {
    if (this._closed || !this._channel || this._lockAbort) return;
    this._requestLock();
  }

  _post(message) {
    try {
      this._channel?.postMessage(message);
    } catch (_) {
      // The channel is closed (this instance is closing).
    }
  }

  _onGroupMessage(message) {
    if (this._closed || !message || typeof message !== 'object') return;
    for (const name of Array.isArray(message.names) ? message.names : []) {
      if (typeof name === 'string' && !this._names.has(name)) {
        this._names.add(name);
        this._listen(this._source, name);
      }
    }
    if (typeof message.cursor === 'string') this._noteCursor(message.cursor);
    switch (message.t) {
      case 'hello':
        // Every tab answers with the names it knows, so whichever tab leads
        // next listens for all of them from its first frame on.
        this._post({ t: 'names', names: [...this._names] });
        if (this._leader) this._post({ t: 'state', state: this._state, cursor: this._cursor });
        break;
      case 'state':
        // The leader's connection state is every follower's ('closed' is
        // only ever this tab's own).
        if (!this._leader && ['connecting', 'open', 'reconnecting'].includes(message.state)) {
          this._setState(message.state);
        }
        break;
      case 'leaving':
        if (!this._leader) this._setState(transition(this._state, 'leader-gone'));
        break;
      case 'event':
        if (!this._leader) this._deliver(message);
        break;
      default:
    }
  }

  // --- the connection (leader, or every tab without sharing) ----------------

  _lead() {
    this._setLeader(true);
    if (this._state === 'open') this._setState('reconnecting');
    this._connect();
  }

  _setLeader(leader) {
    if (this._leader === leader) return;
    this._leader = leader;
    this.onleader?.(leader);
  }

  _connect() {
    this._timer = null;
    if (this._closed || !this._leader || this._source) return;
    if (globalThis.navigator?.onLine === false) {
      this._setState(transition(this._state, 'offline'));
      return; // `online` calls us again.
    }
    const url = streamUrl(this.url, this.topics, this._cursor, this._streamBase);
    const source = new EventSource(url, { withCredentials: this.withCredentials });
    this._source = source;
    this._sourceCursor = this._cursor;
    for (const name of [...CONTROL_EVENTS, ...this._names]) this._listen(source, name);
    source.onerror = () => this._onError(source, url);
  }

  _listen(source, name) {
    source?.addEventListener(name, (e) => {
      if (source === this._source) this._onFrame(e);
    });
  }

  _disconnect() {
    clearTimeout(this._timer);
    this._timer = null;
    this._source?.close();
    this._source = null;
  }

  _onFrame(e) {
    const id = e.lastEventId || null;
    const control = e.type.startsWith('herald.');
    const positions = control ? [] : advancedPositions(this._sourceCursor, id);
    if (id) this._sourceCursor = id;
    const message = { t: 'event', event: e.type, data: e.data, id, positions };
    if (e.type === 'herald.ready') {
      this._attempt = 0;
      this._setState(transition(this._state, 'ready'));
    }
    this._deliver(message);
    this._post(message);
    if (e.type === 'herald.expired') {
      // The node closes the stream next; renew first, then resume.
      this._disconnect();
      this._setState(transition(this._state, 'error'));
      this._renew();
    }
  }

  _onError(source, url) {
    if (source !== this._source) return;
    // EventSource reports a refused answer (401, 403, 429, 502, 503, wrong
    // content type) only as an error with readyState CLOSED; a dropped
    // connection leaves it CONNECTING. It never exposes the status, so for
    // a refusal we ask once with fetch, same URL and credentials: the only
    // way to tell "renew the cookie" (401) from "try again later".
    const refused = source.readyState === EventSource.CLOSED;
    this._disconnect();
    this._setState(transition(this._state, 'error'));
    if (!refused) {
      this._retry();
      return;
    }
    this._probe(url).then((status) => {
      if (this._closed) return;
      if (status === 401) this._renew();
      else this._retry();
    });
  }

  /**
   * The status `/events` answers now (0 when unknown). A 200 would be a
   * stream: the body is cancelled as soon as the headers are in.
   */
  async _probe(url) {
    const abort = new AbortController();
    try {
      const response = await fetch(url, {
        credentials: this.withCredentials ? 'include' : 'same-origin',
        headers: { accept: 'text/event-stream' },
        cache: 'no-store',
        signal: abort.signal,
      });
      return response.status;
    } catch (_) {
      return 0;
    } finally {
      abort.abort();
    }
  }

  /** Awaits `refresh()` (once at a time), then reconnects. */
  async _renew() {
    if (this._renewing || this._closed) return;
    this._renewing = true;
    try {
      await this.refresh?.();
    } catch (error) {
      globalThis.console?.warn?.('herald: refresh() failed', error);
    } finally {
      this._renewing = false;
    }
    if (this._closed || !this._leader || this._source) return;
    // The first renewal reconnects at once; a renewal that did not help
    // (401 again) backs off like any other failure.
    if (this._attempt === 0) {
      this._attempt = 1;
      this._connect();
    } else {
      this._retry();
    }
  }

  _retry() {
    if (this._closed || !this._leader || this._timer !== null) return;
    const delay = backoffDelay(this._attempt);
    this._attempt += 1;
    this._timer = setTimeout(() => this._connect(), delay);
  }

  _online() {
    if (this._closed || !this._leader || this._source) return;
    clearTimeout(this._timer);
    this._timer = null;
    this._attempt = 0;
    this._connect();
  }

  _offline() {
    if (this._closed || !this._leader) return;
    this._disconnect();
    this._setState(transition(this._state, 'offline'));
  }

  // --- every tab ---------------------------------------------------------

  _noteCursor(cursor) {
    const merged = mergeCursors(this._cursor, cursor);
    if (merged !== this._cursor) {
      this._cursor = merged;
      this._store.save(merged);
    }
  }

  /** Shows one event to this tab's handlers, unless it showed it already. */
  _deliver(message) {
    if (typeof message.event !== 'string' || typeof message.data !== 'string') return;
    // Messages come from this origin's other tabs; still, take only the
    // shape this file posts.
    const positions = (Array.isArray(message.positions) ? message.positions : []).filter(
      (p) => Array.isArray(p) && p.length === 2 && typeof p[1] === 'string',
    );
    const admitted = this._recent.admit(positions);
    if (!admitted) return; // a replayed copy
    if (typeof message.id === 'string') this._noteCursor(message.id);
    const meta = { event: message.event, id: message.id ?? undefined };
    if (admitted.channel) meta.channel = admitted.channel;
    const data = parseData(message.data);
    for (const handler of [...(this._handlers.get(message.event) ?? [])]) {
      try {
        handler(data, meta);
      } catch (error) {
        // One handler's bug must not stop the stream or the other handlers.
        globalThis.console?.error?.('herald: handler failed', error);
      }
    }
  }

  _setState(state) {
    if (typeof state !== 'string' || state === this._state) return;
    if (this._state === 'closed') return;
    this._state = state;
    if (this._leader) this._post({ t: 'state', state, cursor: this._cursor });
    this.onstate?.(state);
  }
}
