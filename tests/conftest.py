from fixture_mvtec import *  # noqa
from fixture_synth import *  # noqa
