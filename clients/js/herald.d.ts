// Types for herald.js, Herald's browser client (served by every node as
// /herald.js). See herald.js's header comment for how sharing works.

/** Connection state, as `onstate` reports it. */
export type HeraldState = 'connecting' | 'open' | 'reconnecting' | 'closed';

export interface HeraldOptions {
  /** The stream, `/events` by default; an absolute URL for another origin (CORS + credentials). */
  url?: string;
  /** Topics to subscribe (`?topic=`); the token must allow each. */
  topics?: string[];
  /** One connection for every tab of this origin (Web Locks + BroadcastChannel). Default false. */
  share?: boolean;
  /** Where the cursor survives a reload. Default 'session'. */
  persist?: 'session' | 'local' | 'none';
  /** Renews the cookie; awaited on a 401 and on `herald.expired`, then the client reconnects. */
  refresh?: () => Promise<void> | void;
  /** Send cookies to another origin (EventSource `withCredentials`). Default true. */
  withCredentials?: boolean;
}

/** What came with an event besides its data. */
export interface HeraldMeta {
  /** The event name (`message` when the publisher gave none). */
  event: string;
  /** The channel the message was published to, when the cursor tells. */
  channel?: string;
  /** The cursor after this event (opaque; resuming from it replays what follows). */
  id?: string;
}

/** `herald.reset`: history was lost for these channels; refetch their state. */
export interface HeraldReset {
  channels: string[];
}

/** `herald.ready`: caught up and live. */
export interface HeraldReady {
  node: string;
  user: string;
  channels: string[];
}

export type HeraldHandler<T = unknown> = (data: T, meta: HeraldMeta) => void;

export class Herald {
  constructor(options?: HeraldOptions);
  /** The current state. */
  readonly state: HeraldState;
  /** Whether this tab holds the connection (always true without `share`). */
  readonly leader: boolean;
  /** The newest cursor this tab saw. */
  readonly cursor: string | null;
  /** Called on every state change. */
  onstate: ((state: HeraldState) => void) | null;
  /** Called when this tab starts (`true`) or stops (`false`) leading. */
  onleader: ((leader: boolean) => void) | null;
  /** `data` is JSON-parsed when it is JSON, else the raw string. Returns an unsubscribe function. */
  on(event: 'herald.reset', handler: HeraldHandler<HeraldReset>): () => void;
  on(event: 'herald.ready', handler: HeraldHandler<HeraldReady>): () => void;
  on<T = unknown>(event: string, handler: HeraldHandler<T>): () => void;
  off(event: string, handler: HeraldHandler<any>): void;
  /** Ends the stream for good; another tab takes the lead. */
  close(): void;
}

// The pure parts, exported for tests and tools.
export const MIN_DELAY_MS: number;
export const MAX_DELAY_MS: number;
export const RECENT_LIMIT: number;
export function backoffDelay(attempt: number, random?: () => number): number;
export function transition(
  state: HeraldState,
  input: 'ready' | 'error' | 'offline' | 'leader-gone' | 'close',
): HeraldState;
export function decodeCursor(text: string | null | undefined): Map<string, string> | null;
export function encodeCursor(positions: Map<string, string>): string;
export function compareStreamIds(a: string, b: string): number;
export function mergeCursors(current: string | null, next: string | null): string | null;
export function advancedPositions(previous: string | null, id: string | null): Array<[string | null, string]>;
export function parseData(text: string): unknown;
export function streamUrl(url: string, topics: string[], cursor: string | null, base?: string): string;
export function storageFor(persist: string, scope?: object): Storage | null;
export class RecentSet {
  constructor(limit?: number);
  has(key: string): boolean;
  add(key: string): void;
  admit(positions: Array<[string | null, string]>): { channel?: string } | null;
}
export class CursorStore {
  constructor(storage: Storage | null, key: string);
  load(): string | null;
  save(cursor: string | null): void;
}
