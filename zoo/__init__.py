"""DEQ Zoo: six reproduction projects built on `core`. A project never imports another."""
