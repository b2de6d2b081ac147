"""Ray Tune searches: space, search (run_search), summary."""
