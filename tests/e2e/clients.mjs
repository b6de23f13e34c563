// Many real EventSource clients (the npm `eventsource` package, a WHATWG
// implementation: automatic reconnect, `retry:`, `Last-Event-ID`) connected
// to Herald through nginx with the `herald_token` cookie, as browsers would.
//
// Driven by tests/deploy over stdin/stdout, one JSON object per line:
//
//   argv[2]: {"url": "http://127.0.0.1:PORT/events", "clients": [{"name": "u1", "token": "JWT"}, ...]}
//   stdout:  {"type":"ready","client":I,"node":"<node id>","n":<how many herald.ready so far>}
//            once per herald.ready (again after every reconnect)
//   stdin "counts" -> {"type":"counts","counts":[messages per client],"readies":[...],"closed":[...]}
//   stdin "report" -> {"type":"report","clients":[{"name","received":[data...],"events":[name...],
//                       "readies","nodes":[node ids in order],"resets","errors","closed"}]}
//   stdin "close"  -> closes every client and exits
//
// An application message is any event but the herald.* control events; the
// demo's "notice" and the default "message" are what the tests publish.
import { EventSource } from 'eventsource';
import { createInterface } from 'node:readline';

const config = JSON.parse(process.argv[2]);
const emit = (value) => process.stdout.write(JSON.stringify(value) + '\n');

const clients = config.clients.map((spec, index) => {
  const state = {
    name: spec.name,
    received: [],
    events: [],
    readies: 0,
    nodes: [],
    resets: 0,
    errors: 0,
    closed: false,
  };
  // EventSource cannot set headers; a browser sends the cookie by itself.
  // Here the cookie is added to each (re)connect request through the
  // `fetch` option, keeping the library's own headers (Accept,
  // Last-Event-ID) intact.
  const cookie = `herald_token=${spec.token}`;
  const source = new EventSource(config.url, {
    fetch: (input, init) =>
      fetch(input, { ...init, headers: { ...init.headers, Cookie: cookie } }),
  });
  const onMessage = (event) => {
    state.received.push(event.data);
    state.events.push(event.type);
  };
  source.addEventListener('message', onMessage);
  source.addEventListener('notice', onMessage);
  source.addEventListener('herald.ready', (event) => {
    const ready = JSON.parse(event.data);
    state.readies += 1;
    state.nodes.push(ready.node);
    emit({ type: 'ready', client: index, node: ready.node, n: state.readies });
  });
  source.addEventListener('herald.reset', () => {
    state.resets += 1;
  });
  source.addEventListener('error', () => {
    state.errors += 1;
    // CLOSED after an error means the client gave up for good (a non-200
    // answer): the tests treat that as a failure, so report it.
    if (source.readyState === EventSource.CLOSED) state.closed = true;
  });
  return { source, state };
});

const commands = createInterface({ input: process.stdin });
commands.on('line', (line) => {
  switch (line.trim()) {
    case '':
      break;
    case 'counts':
      emit({
        type: 'counts',
        counts: clients.map((c) => c.state.received.length),
        readies: clients.map((c) => c.state.readies),
        closed: clients.map((c) => c.state.closed),
      });
      break;
    case 'report':
      emit({ type: 'report', clients: clients.map((c) => c.state) });
      break;
    case 'close':
      for (const c of clients) c.source.close();
      process.exit(0);
    default:
      emit({ type: 'error', message: `unknown command ${JSON.stringify(line)}` });
  }
});
// The test going away (stdin closed) ends the clients too.
commands.on('close', () => {
  for (const c of clients) c.source.close();
  process.exit(0);
});
