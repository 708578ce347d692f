# IPython startup for bluesky-deepfocus: everything comes from configure_session().
#   ipython --profile-dir=profiles/profile_deepfocus
# Environment: BLUESKY_DEEPFOCUS_CONFIG (a Micro-Manager MMConfig.cfg; default: the simulated
# microscope), BLUESKY_DEEPFOCUS_CATALOG (catalog folder or Tiled URL).
import os

from bluesky_deepfocus import configure_session

configure_session(
    get_ipython().user_ns,  # noqa: F821 - provided by IPython
    config_file=os.environ.get("BLUESKY_DEEPFOCUS_CONFIG") or None,
    objective=os.environ.get("BLUESKY_DEEPFOCUS_OBJECTIVE", "10x/0.3"),
    sensor=int(os.environ.get("BLUESKY_DEEPFOCUS_SENSOR", "512")),
)
