"""The DuCa cache plugin: policies (registered in CACHES), token selection, stored features,
the cache-aware block runner and the manager. Entry points: :func:`apply_cache`,
:func:`remove_cache`."""
from .manager import CacheManager, apply_cache, build_policy, get_cache_manager, remove_cache  # noqa: F401
from .plan import ACTIONS, FULL, KINDS, PARTIAL, REUSE, StepPlan  # noqa: F401
from .policies import DuCa, FORA, PAB, NoCache, ToCa, TrunkReuse  # noqa: F401
