"""Joint retriever–generator training (`joint` config group): retriever losses, the joint loop, and the
asynchronous index refresh that keeps a trained passage encoder's index current without stopping training."""
