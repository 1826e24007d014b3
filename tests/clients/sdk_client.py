"""An official Python `mcp` client (1.x or 2.x) through the resilience layer.

Run by tests/server_sdk_clients.rs with the server's URL. Prints one JSON
line per step; on {"step": "wait"} it waits for a line on stdin (the test
moves the limiter's clock past the retry hint) before going on.
"""

import asyncio
import contextlib
import json
import sys

URL = sys.argv[1]

try:  # mcp 2.x
    from mcp import Client
    from mcp.shared.exceptions import MCPError as ErrorType

    V2 = True
except ImportError:  # mcp 1.x
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client
    from mcp.shared.exceptions import McpError as ErrorType

    V2 = False


def say(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)


@contextlib.asynccontextmanager
async def connect():
    if V2:
        async with Client(URL) as client:
            yield client
    else:
        async with streamablehttp_client(URL) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


async def call(session, step, tool, quiet=False):
    """Calls `tool`; says how it went (unless `quiet` and it went well)."""
    try:
        result = await session.call_tool(tool, {"message": "hi"})
    except ErrorType as e:
        data = e.error.data if isinstance(e.error.data, dict) else {}
        say(step, ok=False, code=e.error.code, retryAfterMs=data.get("retryAfterMs"), key=data.get("key"))
        return False
    except Exception as e:  # the transport failed: the session is lost
        say(step, ok=False, code=None, transport=f"{type(e).__name__}: {e}")
        raise
    ok = not getattr(result, "isError", False)
    if not (quiet and ok):
        say(step, ok=ok, code=None)
    return ok


async def main():
    async with connect() as a:
        say("connected")
        await call(a, "fail", "fail")
        await call(a, "breaker", "fail")
        await call(a, "after-breaker", "echo")
        # Until the session's budget is spent (the SDKs send requests of
        # their own, such as tools/list, which count too).
        for _ in range(50):
            if not await call(a, "limited", "echo", quiet=True):
                break
        async with connect() as b:
            await call(b, "second-session", "echo")
        say("wait")
        await asyncio.to_thread(sys.stdin.readline)
        await call(a, "after-wait", "echo")
    say("done")


asyncio.run(main())
