"""The service's Ray actors: the controller and the shard servers. Nothing here imports the client
modules, and no shard calls the controller while it answers a query."""
