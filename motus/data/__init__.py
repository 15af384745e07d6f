"""The data pyramid: episodes, versioned tiers (shards + manifest), sources, and the window loader."""
