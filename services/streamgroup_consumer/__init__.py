"""The consumer service: reads its share of the stream through the group and handles it."""
