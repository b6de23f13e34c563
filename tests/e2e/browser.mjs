// Headless Debian Chromium (through playwright-core, no bundled browser)
// opens Herald's demo page through nginx with the `herald_token` cookie, as
// a signed-in user's browser would, and reports what the page shows.
//
// argv[2]: {"base": "http://127.0.0.1:PORT", "token": "JWT", "expect": "TEXT",
//           "form": "TEXT", "screenshot": "PATH"}
// stdout, one JSON object per line:
//   {"type":"live","status":...}    the page says "open" (herald.ready arrived);
//                                   the test now publishes EXPECT from elsewhere
//   {"type":"done","status":...,"items":[{"event","data"}],"publishResult":...}
//                                   EXPECT appeared; then FORM was sent with the
//                                   page's own form and appeared too; screenshot saved
//   {"type":"failed","message":...,"status":...,"items":[...]}
import { chromium } from 'playwright-core';

const config = JSON.parse(process.argv[2]);
const emit = (value) => process.stdout.write(JSON.stringify(value) + '\n');
const WAIT_MS = 20_000;

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
  ],
});

let page;
const snapshot = async () => {
  if (!page) return {};
  return page.evaluate(() => ({
    status: document.getElementById('status')?.textContent ?? null,
    detail: document.getElementById('status-detail')?.textContent ?? null,
    role: document.getElementById('role')?.textContent ?? null,
    publishResult: document.getElementById('publish-result')?.textContent ?? null,
    items: [...document.querySelectorAll('#notifications li')].map((li) => ({
      event: li.querySelector('.event')?.textContent ?? '',
      data: li.querySelector('.data')?.textContent ?? '',
    })),
  }));
};
// The notification list contains an item whose data is exactly `text`.
const showsItem = (text) =>
  page.waitForFunction(
    (wanted) =>
      [...document.querySelectorAll('#notifications li .data')].some(
        (el) => el.textContent === wanted,
      ),
    text,
    { timeout: WAIT_MS },
  );

try {
  const context = await browser.newContext({ viewport: { width: 900, height: 700 } });
  // What the application's login would have set: a cookie for the Herald
  // origin (readable by the page, which shows who is signed in).
  await context.addCookies([{ name: 'herald_token', value: config.token, url: config.base }]);
  page = await context.newPage();
  page.on('console', (msg) => process.stderr.write(`console.${msg.type()}: ${msg.text()}\n`));
  page.on('pageerror', (err) => process.stderr.write(`page error: ${err.message}\n`));

  await page.goto(`${config.base}/`, { timeout: WAIT_MS });
  await page.waitForSelector('#status[data-state="open"]', { timeout: WAIT_MS });
  emit({ type: 'live', ...(await snapshot()) });

  // Published by the test, elsewhere (straight into Redis).
  await showsItem(config.expect);

  // The page's own form: POST /publish through nginx, back over the stream.
  await page.fill('#text', config.form);
  await page.click('button[type="submit"]');
  await showsItem(config.form);
  await page.waitForFunction(
    () => document.getElementById('publish-result')?.textContent.startsWith('Published'),
    null,
    { timeout: WAIT_MS },
  );

  await page.screenshot({ path: config.screenshot, fullPage: true });
  emit({ type: 'done', ...(await snapshot()) });
  await browser.close();
} catch (err) {
  let state = {};
  try {
    state = await snapshot();
    if (page) await page.screenshot({ path: config.screenshot, fullPage: true });
  } catch (_) {
    // The page may be gone; report what we have.
  }
  emit({ type: 'failed', message: String(err && err.message ? err.message : err), ...state });
  await browser.close();
  process.exit(1);
}
