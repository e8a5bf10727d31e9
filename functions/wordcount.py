"""Word count over a large upload, without copying it: the body is a read-only view of shared
memory, or, for a chunked upload, a CAP_Stream read as it arrives."""

CHUNK = 1 << 20


def chunks(event):
    """The body one megabyte at a time: memory stays flat whatever its size."""
    if event.stream is not None:  # a chunked upload, still arriving
        while piece := event.stream.read(CHUNK):
            yield piece
        return
    body = event.body  # a memoryview onto the bytes the gateway placed in this cVM's memory
    for start in range(0, len(body), CHUNK):
        yield bytes(body[start:start + CHUNK])


def handle(event, context):
    size = words = lines = 0
    previous_ended_in_word = False
    for piece in chunks(event):
        size += len(piece)
        words += len(piece.split())
        lines += piece.count(b"\n")
        if previous_ended_in_word and piece[:1] and not piece[:1].isspace():
            words -= 1  # a word cut by the chunk boundary was counted in both chunks
        previous_ended_in_word = bool(piece) and not piece[-1:].isspace()
    return {"statusCode": 200, "body": {"bytes": size, "words": words, "lines": lines}}
