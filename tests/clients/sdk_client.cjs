// The official TypeScript SDK client through the resilience layer.
//
// Run by tests/server_sdk_clients.rs as `node sdk_client.cjs <url>` with
// TS_SDK_NODE_MODULES naming the folder that holds @modelcontextprotocol/sdk.
// Prints one JSON line per step; on {"step":"wait"} it waits for a line on
// stdin (the test moves the limiter's clock past the retry hint).
const readline = require("node:readline");

const modules = process.env.TS_SDK_NODE_MODULES;
const load = (path) => require(require.resolve(path, { paths: [modules] }));
const { Client } = load("@modelcontextprotocol/sdk/client/index.js");
const { StreamableHTTPClientTransport } = load("@modelcontextprotocol/sdk/client/streamableHttp.js");

const url = new URL(process.argv[2]);
const say = (step, fields = {}) => console.log(JSON.stringify({ step, ...fields }));

async function connect() {
  const client = new Client({ name: "ts-sdk", version: "1.0.0" });
  await client.connect(new StreamableHTTPClientTransport(url));
  return client;
}

async function call(client, step, tool, quiet = false) {
  try {
    const result = await client.callTool({ name: tool, arguments: { message: "hi" } });
    if (!(quiet && !result.isError)) say(step, { ok: !result.isError, code: null });
    return !result.isError;
  } catch (e) {
    const data = e && typeof e.data === "object" && e.data !== null ? e.data : {};
    say(step, {
      ok: false,
      code: typeof e.code === "number" ? e.code : null,
      retryAfterMs: data.retryAfterMs ?? null,
      key: data.key ?? null,
      transport: e && e.constructor ? `${e.constructor.name}: ${e.message}` : String(e),
    });
    return false;
  }
}

const lines = readline.createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => lines.once("line", resolve));

(async () => {
  const a = await connect();
  say("connected");
  await call(a, "fail", "fail");
  await call(a, "breaker", "fail");
  await call(a, "after-breaker", "echo");
  // Until the session's budget is spent.
  for (let n = 0; n < 50; n++) {
    if (!(await call(a, "limited", "echo", true))) break;
  }
  const b = await connect();
  await call(b, "second-session", "echo");
  await b.close();
  say("wait");
  await nextLine();
  await call(a, "after-wait", "echo");
  await a.close();
  say("done");
  lines.close();
})().catch((e) => {
  say("crashed", { error: String(e) });
  process.exit(1);
});
