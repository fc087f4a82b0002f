"""tq_mooncake.dashboard: the Streamlit dashboard of retry and exhaustion rates (``tq-mooncake dashboard``).

``metrics`` (parsing and arithmetic, no Streamlit), ``sources`` (files, Prometheus), ``settings`` (flags),
``tiles`` (the headline figures as text), ``app`` (the page), ``sample_run`` (a faulty workload that exports
metrics) and ``screenshot`` (the page in headless Chromium). Importing this package loads none of them.
"""
