"""A note kept in a CAP_File: ``PUT`` stores the body (up to 64 KiB), ``GET`` reads it back.

The CAP_File ``notes`` is created on the first PUT and owned by this function; other functions
could be granted it (``context.files.grant``) and open ``/cap/notes`` themselves."""

SIZE = 64 << 10


def handle(event, context):
    if event.method == "PUT":
        if len(event.body) > SIZE - 8:
            return {"statusCode": 413, "body": f"a note holds at most {SIZE - 8} bytes"}
        try:
            note = context.files.open("notes", "r+b")
        except FileNotFoundError:
            note = context.files.create("notes", SIZE)
        with note:
            note.write(len(event.body).to_bytes(8, "little"))
            note.write(event.body)
        return {"statusCode": 204}
    try:
        with open("/cap/notes", "rb") as note:
            length = int.from_bytes(note.read(8), "little")
            return {"headers": {"Content-Type": "text/plain; charset=utf-8"}, "body": note.read(length)}
    except FileNotFoundError:
        return {"statusCode": 404, "body": "no note yet: PUT one first"}
