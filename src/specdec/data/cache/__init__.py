"""The target cache: sample format, feature codecs, manifest, writer, reader, stream, builder and planner."""
