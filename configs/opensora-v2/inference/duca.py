# Open-Sora 2.0 at 256px with DuCa dual feature caching (every field optional; the policies and
# their fields: docs/policies.md).
_base_ = ["256px.py"]
cache = dict(type="DuCa")
