"""A streamed response: one line every ``?interval=`` seconds (default 0.5), ``?count=`` of them
(default 5), sent to the client as each is yielded (chunked)."""
import time


def handle(event, context):
    count = min(int(event.query.get("count", "5")), 1000)
    interval = min(float(event.query.get("interval", "0.5")), 10.0)

    def lines():
        for number in range(1, count + 1):
            yield f"tick {number} of {count} at {time.strftime('%H:%M:%S')}\n"
            if number < count:
                time.sleep(interval)

    return {"headers": {"Content-Type": "text/plain; charset=utf-8"}, "body": lines()}
