"""The producer service: the original design's N producers, each adding one message per interval."""
