"""An async def handler: waits without blocking, then answers (?seconds=N, default 0.1)."""
import asyncio


async def handle(event, context):
    seconds = float(event.query.get("seconds", "0.1"))
    await asyncio.sleep(min(seconds, context.remaining_time()))
    return f"slept {seconds:g} s\n"
