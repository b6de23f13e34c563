// Unit tests for the pure parts of herald.js: `node --test clients/js/test/`.
// The browser behaviour (sharing, reloads, refresh) is proven in real
// Chromium by tests/deploy/browser_client.rs.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  MAX_DELAY_MS,
  MIN_DELAY_MS,
  CursorStore,
  RecentSet,
  advancedPositions,
  backoffDelay,
  compareStreamIds,
  decodeCursor,
  encodeCursor,
  mergeCursors,
  parseData,
  storageFor,
  streamUrl,
  transition,
} from '../herald.js';

const cursor = (positions) => encodeCursor(new Map(Object.entries(positions)));

test('backoff starts near 0.5 s, doubles, and stops at 30 s', () => {
  const middle = () => 0.5; // jitter factor 1
  assert.equal(backoffDelay(0, middle), MIN_DELAY_MS);
  assert.equal(backoffDelay(1, middle), 1000);
  assert.equal(backoffDelay(2, middle), 2000);
  assert.equal(backoffDelay(6, middle), MAX_DELAY_MS); // 32 s, capped
  assert.equal(backoffDelay(1000, middle), MAX_DELAY_MS);
  assert.equal(backoffDelay(-3, middle), MIN_DELAY_MS);
});

test('backoff jitter spreads delays over half to one and a half times the base', () => {
  assert.equal(backoffDelay(0, () => 0), 250);
  assert.equal(backoffDelay(0, () => 0.999), 750);
  assert.equal(backoffDelay(3, () => 0), 2000);
  // Even the largest jitter never exceeds the cap.
  assert.equal(backoffDelay(20, () => 0.999), MAX_DELAY_MS);
  const delays = new Set(Array.from({ length: 50 }, () => backoffDelay(2)));
  assert.ok(delays.size > 10, `random jitter, got ${[...delays]}`);
  for (const d of delays) assert.ok(d >= 1000 && d < 3000, `${d}`);
});

test('state machine: connecting → open → reconnecting → open, closed is final', () => {
  let state = 'connecting';
  state = transition(state, 'error');
  assert.equal(state, 'reconnecting', 'a failed first attempt');
  state = transition(state, 'ready');
  assert.equal(state, 'open');
  for (const input of ['error', 'offline', 'leader-gone']) {
    assert.equal(transition('open', input), 'reconnecting', input);
  }
  assert.equal(transition('connecting', 'unknown-input'), 'connecting');
  state = transition(state, 'close');
  assert.equal(state, 'closed');
  for (const input of ['ready', 'error', 'offline', 'close']) {
    assert.equal(transition(state, input), 'closed', `closed stays closed on ${input}`);
  }
});

test('cursors decode, encode and round-trip with the server format', () => {
  // As src/sse.rs writes it: v1. + base64url(JSON) without padding.
  const text = 'v1.' + Buffer.from('{"broadcast":"5-0","user:ü":"17-3"}').toString('base64url');
  const positions = decodeCursor(text);
  assert.deepEqual([...positions], [['broadcast', '5-0'], ['user:ü', '17-3']]);
  assert.equal(encodeCursor(positions), text);
  for (const bad of [null, '', 'v1.', 'v2.e30', 'v1.!!!', 'v1.' + Buffer.from('[1]').toString('base64url'),
    'v1.' + Buffer.from('{"a":"x"}').toString('base64url'), '12345-0']) {
    assert.equal(decodeCursor(bad), null, `${bad}`);
  }
});

test('stream ids compare as numbers of any size', () => {
  assert.ok(compareStreamIds('10-0', '9-0') > 0);
  assert.ok(compareStreamIds('9-10', '9-9') > 0);
  assert.equal(compareStreamIds('1732240000000-5', '1732240000000-5'), 0);
  assert.ok(compareStreamIds('18446744073709551615-0', '18446744073709551614-9') > 0);
});

test('merging keeps the newest position of every channel', () => {
  const a = cursor({ broadcast: '5-0', 'user:a': '9-0' });
  const b = cursor({ broadcast: '7-0', 'user:a': '8-0', 'topic:x': '1-0' });
  assert.deepEqual(Object.fromEntries(decodeCursor(mergeCursors(a, b))), {
    broadcast: '7-0',
    'user:a': '9-0',
    'topic:x': '1-0',
  });
  assert.equal(mergeCursors(null, a), a);
  assert.equal(mergeCursors(a, null), a);
  // Not v1: the newer text wins as is.
  assert.equal(mergeCursors('opaque-1', 'opaque-2'), 'opaque-2');
  assert.equal(mergeCursors(a, 'opaque'), a);
  assert.equal(mergeCursors('opaque', a), a);
});

test('a message advances one channel; an id-less one advances none', () => {
  const before = cursor({ broadcast: '5-0', 'user:a': '9-0' });
  const after = cursor({ broadcast: '6-0', 'user:a': '9-0' });
  assert.deepEqual(advancedPositions(before, after), [['broadcast', '6-0']]);
  assert.deepEqual(advancedPositions(after, after), [], 'same cursor: published without id');
  assert.deepEqual(advancedPositions(after, null), []);
  // A fresh connection's first frame: everything is new.
  assert.deepEqual(advancedPositions(null, after), [['broadcast', '6-0'], ['user:a', '9-0']]);
  // Not v1: the text itself is the identity.
  assert.deepEqual(advancedPositions('a', 'b'), [[null, 'b']]);
});

test('the recent set is bounded and forgets the oldest first', () => {
  const recent = new RecentSet(3);
  for (const k of ['a', 'b', 'c', 'd']) recent.add(k);
  assert.equal(recent.has('a'), false);
  assert.ok(['b', 'c', 'd'].every((k) => recent.has(k)));
  recent.add('b'); // touched: now the newest
  recent.add('e');
  assert.equal(recent.has('c'), false);
  assert.ok(recent.has('b'));
});

class MemoryStorage {
  constructor() {
    this.items = new Map();
  }
  getItem(key) {
    return this.items.has(key) ? this.items.get(key) : null;
  }
  setItem(key, value) {
    this.items.set(key, String(value));
  }
}

test('the cursor store keeps the last cursor per key and survives broken storage', () => {
  const storage = new MemoryStorage();
  const store = new CursorStore(storage, 'herald:a');
  assert.equal(store.load(), null);
  store.save('v1.x');
  store.save(null); // ignored
  assert.equal(new CursorStore(storage, 'herald:a').load(), 'v1.x', 'a reload reads it back');
  assert.equal(new CursorStore(storage, 'herald:b').load(), null, 'other streams are apart');

  const throwing = {
    getItem() {
      throw new Error('SecurityError');
    },
    setItem() {
      throw new Error('QuotaExceededError');
    },
  };
  const broken = new CursorStore(throwing, 'k');
  broken.save('v1.x');
  assert.equal(broken.load(), null);
  assert.equal(new CursorStore(null, 'k').load(), null, "persist: 'none'");
});

test('persist names its storage', () => {
  const scope = { sessionStorage: 'S', localStorage: 'L' };
  assert.equal(storageFor('session', scope), 'S');
  assert.equal(storageFor('local', scope), 'L');
  assert.equal(storageFor('none', scope), null);
  const denied = {
    get localStorage() {
      throw new Error('SecurityError');
    },
  };
  assert.equal(storageFor('local', denied), null);
});

test('data is parsed when it is JSON, else kept as text', () => {
  assert.deepEqual(parseData('{"a":[1,2]}'), { a: [1, 2] });
  assert.equal(parseData('42'), 42);
  assert.equal(parseData('hello world'), 'hello world');
  assert.equal(parseData('line 1\nline 2'), 'line 1\nline 2');
});

test('the stream URL carries topics and the resume cursor', () => {
  assert.equal(
    streamUrl('/events', ['news', 'a b'], 'v1.abc', 'https://app.example/page'),
    'https://app.example/events?topic=news&topic=a+b&last_event_id=v1.abc',
  );
  assert.equal(streamUrl('https://push.example/events', [], null, undefined), 'https://push.example/events');
});

test('a handover replays copies: each tab drops what it showed, keeps the rest', () => {
  // Tab X showed two messages from the old leader's connection.
  const tab = new RecentSet();
  const start = cursor({ broadcast: '1-0', 'user:a': '1-0' });
  const m1 = cursor({ broadcast: '2-0', 'user:a': '1-0' });
  const m2 = cursor({ broadcast: '2-0', 'user:a': '3-0' });
  assert.deepEqual(tab.admit(advancedPositions(start, m1)), { channel: 'broadcast' });
  assert.deepEqual(tab.admit(advancedPositions(m1, m2)), { channel: 'user:a' });

  // The new leader resumed from an older cursor (broadcast 1-0); the node
  // moved the other channel to its tip at once, and replays broadcast 2-0.
  const resumedFrom = cursor({ broadcast: '1-0' });
  const r1 = cursor({ broadcast: '2-0', 'user:a': '3-0' });
  assert.equal(tab.admit(advancedPositions(resumedFrom, r1)), null, 'shown already');
  // What neither connection had shown before is new, on its channel.
  const r2 = cursor({ broadcast: '4-0', 'user:a': '3-0' });
  assert.deepEqual(tab.admit(advancedPositions(r1, r2)), { channel: 'broadcast' });
  // A message published without a stream id leaves the cursor as it was:
  // it is never a copy (nothing replays it), and its channel is unknown.
  assert.deepEqual(tab.admit(advancedPositions(r2, r2)), { channel: undefined });
  assert.deepEqual(tab.admit(advancedPositions(r2, r2)), { channel: undefined });
  // A cursor in another format is deduplicated by its text.
  assert.deepEqual(tab.admit(advancedPositions('x1', 'x2')), { channel: undefined });
  assert.equal(tab.admit(advancedPositions('x1', 'x2')), null);
});
