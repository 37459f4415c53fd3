"""The demo wing: the synthetic world, its trained tiny models, the truth metrics. Production code never imports it."""
