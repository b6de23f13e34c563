// Headless Debian Chromium (through playwright-core) with several tabs of
// one signed-in user, each running herald.js exactly as an application page
// would: `import { Herald } from '/herald.js'`, served by the nodes through
// nginx. Driven by tests/deploy/browser_client.rs over stdin/stdout.
//
// argv[2]: {"base": "http://127.0.0.1:PORT", "token": "JWT", "fresh": "JWT",
//           "insecure": false}
//   token: the cookie every tab starts with; fresh: what the page's
//   refresh() puts in the cookie (as an app's "renew session" call would);
//   insecure: accept a self-signed certificate.
//
// stdin, one JSON command per line; each is answered by one stdout line:
//   {"cmd":"open","tab":"a","options":{...}}  -> {"type":"opened","tab":"a"}
//       a new tab on the test page; options go to `new Herald(options)`
//   {"cmd":"close","tab":"a"}                 -> {"type":"closed","tab":"a"}
//   {"cmd":"reload","tab":"a"}                -> {"type":"reloaded","tab":"a"}
//   {"cmd":"away","tab":"a"}, {"cmd":"back","tab":"a"}  a reload in two steps
//   {"cmd":"cookie","value":"JWT"}            -> {"type":"cookie"}
//   {"cmd":"offline","value":true|false}      -> {"type":"offline"}
//   {"cmd":"freeze","tab":"a"}, {"cmd":"resume","tab":"a"}  Page Lifecycle events
//   {"cmd":"report"}                          -> {"type":"report","tabs":{...}}
//       per tab: every notice's data in the order shown (across reloads), the
//       node of each herald.ready of its own connection, states, whether it
//       leads now, refreshes
//   {"cmd":"quit"}
// A failure is {"type":"failed","message":...}.
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const config = JSON.parse(process.argv[2]);
const emit = (value) => process.stdout.write(JSON.stringify(value) + '\n');
const WAIT_MS = 20_000;
const PAGE = '/herald-test.html';

// The application page: herald.js and nothing else. Every observation goes
// to this script through the `heraldReport` binding, so it survives reloads.
const TEST_PAGE = `<!doctype html>
<meta charset="utf-8">
<title>herald.js test page</title>
<script type="module">
import { Herald } from '/herald.js';
const report = (kind, value) => window.heraldReport({ kind, ...value });
const options = JSON.parse(decodeURIComponent(location.hash.slice(1) || '%7B%7D'));
const herald = new Herald({
  ...options,
  refresh: async () => {
    // What an app's refresh does: renew the session, set the new cookie.
    const token = await window.heraldFreshToken();
    document.cookie = 'herald_token=' + token + '; path=/; SameSite=Lax';
    report('refresh', {});
  },
});
herald.onstate = (state) => report('state', { state });
herald.onleader = (leader) => report('leader', { leader });
// What the tab showed, kept in the tab's sessionStorage like the cursor: a
// report sent in the instant before a reload can be lost with the page,
// this log cannot (it is written in the same task as herald.js's cursor).
const SHOWN = 'herald-test:shown';
const shown = JSON.parse(sessionStorage.getItem(SHOWN) || '[]');
herald.on('notice', (data, meta) => {
  shown.push({ data: typeof data === 'string' ? data : JSON.stringify(data), channel: meta.channel ?? null });
  sessionStorage.setItem(SHOWN, JSON.stringify(shown));
});
// Followers get the leader's herald.ready too; count this tab's own.
herald.on('herald.ready', (data) => herald.leader && report('ready', { node: data.node }));
herald.on('herald.expired', () => report('expired', {}));
window.herald = herald;
// How this page reached the origin ('h2' over nginx's TLS block).
const protocol = performance.getEntriesByType('resource').find((e) => e.name.endsWith('/herald.js'))?.nextHopProtocol ?? null;
report('loaded', { leader: herald.leader, state: herald.state, protocol });
</script>`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    // Background tabs must keep running their timers and tasks at full
    // speed: the tabs here are all "background" to a headless browser.
    '--disable-background-timer-throttling',
    '--disable-renderer-backgrounding',
    '--disable-backgrounding-occluded-windows',
  ],
});
// `insecure`: the cluster's self-signed certificate (deploy/cluster --tls).
const context = await browser.newContext({ ignoreHTTPSErrors: Boolean(config.insecure) });
await context.addCookies([{ name: 'herald_token', value: config.token, url: config.base }]);
// Only the test page itself is made up; /herald.js, /events and the rest
// come from the nodes through nginx.
await context.route(config.base + PAGE + '*', (route) =>
  route.fulfill({ status: 200, contentType: 'text/html; charset=utf-8', body: TEST_PAGE }),
);

/** tab name -> { page, record } */
const tabs = new Map();
const record = () => ({
  received: [],
  channels: [],
  readies: [],
  states: [],
  leader: false,
  leaderSince: null,
  refreshes: 0,
  expired: 0,
  loads: 0,
  errors: [],
});
const tabOf = (page) => [...tabs.entries()].find(([, t]) => t.page === page)?.[0];

await context.exposeBinding('heraldReport', ({ page }, message) => {
  const name = tabOf(page);
  if (!name) return;
  const r = tabs.get(name).record;
  switch (message.kind) {
    case 'ready':
      r.readies.push(message.node);
      break;
    case 'state':
      r.states.push(message.state);
      break;
    case 'leader':
      r.leader = message.leader;
      r.leaderSince = message.leader ? Date.now() : null;
      break;
    case 'refresh':
      r.refreshes += 1;
      break;
    case 'expired':
      r.expired += 1;
      break;
    case 'loaded':
      r.loads += 1;
      r.leader = message.leader;
      r.protocol = message.protocol;
      break;
    default:
  }
});
await context.exposeBinding('heraldFreshToken', () => config.fresh);

/** Copies the tab's log of shown events into its record (kept as it was
 * while the tab is closed, away or between pages). */
async function readShown(entry) {
  if (entry.page.isClosed() || !entry.page.url().startsWith(config.base)) return;
  try {
    const shown = await entry.page.evaluate(() => JSON.parse(sessionStorage.getItem('herald-test:shown') || '[]'));
    entry.record.received = shown.map((s) => s.data);
    entry.record.channels = shown.map((s) => s.channel);
  } catch (_) {
    // Navigating: the next report reads it.
  }
}

async function run(command) {
  switch (command.cmd) {
    case 'open': {
      const page = await context.newPage();
      const entry = { page, record: record() };
      tabs.set(command.tab, entry);
      page.on('pageerror', (err) => entry.record.errors.push(err.message));
      page.on('console', (msg) => {
        if (msg.type() === 'error' || msg.type() === 'warning') {
          process.stderr.write(`${command.tab} console.${msg.type()}: ${msg.text()}\n`);
        }
      });
      const hash = encodeURIComponent(JSON.stringify(command.options ?? {}));
      entry.url = `${config.base}${PAGE}#${hash}`;
      await page.goto(entry.url, { timeout: WAIT_MS });
      return { type: 'opened', tab: command.tab };
    }
    case 'close': {
      const entry = tabs.get(command.tab);
      await readShown(entry);
      await entry.page.close();
      entry.record.leader = false;
      entry.record.closedAt = Date.now();
      return { type: 'closed', tab: command.tab, at: entry.record.closedAt };
    }
    case 'reload': {
      const entry = tabs.get(command.tab);
      entry.record.leader = false;
      await entry.page.reload({ timeout: WAIT_MS });
      return { type: 'reloaded', tab: command.tab };
    }
    // A reload with a pause in the middle, so the test knows what was
    // published while no page was there: the tab leaves for about:blank
    // (the page unloads) and later loads the page again, with the same
    // sessionStorage, as a reload would.
    case 'away': {
      const entry = tabs.get(command.tab);
      await readShown(entry);
      entry.record.leader = false;
      await entry.page.goto('about:blank', { timeout: WAIT_MS });
      return { type: 'away', tab: command.tab };
    }
    case 'back': {
      const entry = tabs.get(command.tab);
      await entry.page.goto(entry.url, { timeout: WAIT_MS });
      return { type: 'back', tab: command.tab };
    }
    // The browser's network goes away (pages get `offline`) or comes back.
    case 'offline':
      await context.setOffline(Boolean(command.value));
      return { type: 'offline' };
    // The `freeze` and `resume` events of the Page Lifecycle, which a
    // browser fires on a background tab before it stops running its tasks
    // and when it runs them again. Dispatched by hand:
    // CDP's Page.setWebLifecycleState does not freeze a headless page, whose
    // tabs are all visible. So this shows what the tab does on these events,
    // not that a browser freezes it.
    case 'freeze':
    case 'resume': {
      const entry = tabs.get(command.tab);
      await entry.page.evaluate((name) => document.dispatchEvent(new Event(name)), command.cmd);
      return { type: command.cmd };
    }
    case 'cookie':
      await context.addCookies([{ name: 'herald_token', value: command.value, url: config.base }]);
      return { type: 'cookie' };
    case 'report': {
      const out = {};
      for (const [name, entry] of tabs) {
        await readShown(entry);
        out[name] = entry.record;
      }
      return { type: 'report', now: Date.now(), tabs: out };
    }
    case 'quit':
      await browser.close();
      process.exit(0);
    default:
      throw new Error(`unknown command ${JSON.stringify(command)}`);
  }
}

emit({ type: 'started' });
const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  try {
    emit(await run(JSON.parse(line)));
  } catch (err) {
    emit({ type: 'failed', message: String(err && err.message ? err.message : err) });
  }
}
await browser.close();
