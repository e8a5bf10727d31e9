"""Hello: greets whoever the request body names."""


def handle(event, context):
    name = event.text.strip() or "world"
    return f"Hello, {name}!\n"
