"""Model presets (models/*.json) and `ray up` cluster configurations (clusters/*.yaml)."""
