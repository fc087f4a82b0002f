"""tq_mooncake.dashboard: the Streamlit dashboard (see issue 5)."""
