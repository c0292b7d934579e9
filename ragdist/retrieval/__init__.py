"""The retrieval service: shard actors on Ray, a controller, and a fan-out/merge client."""
