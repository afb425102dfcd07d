"""The engine every stage shares: config, cache, graph, CLI, data sets, boxes and metrics."""
