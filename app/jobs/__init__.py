"""Jobs: the manager, the runner, pipelines, token sources, progress and the snapshot store."""
