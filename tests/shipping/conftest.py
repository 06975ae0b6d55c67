import pytest

from tdhook_fx import zoo


@pytest.fixture(scope="session")
def built_in():
    """The command line's built-in models, each built once per test process (captures are reused).

    While it is active, `zoo.BUILT_IN[name]()` returns that one sample, so the command line
    compiles onto an already captured model.
    """
    made = {}
    original = dict(zoo.BUILT_IN)

    def factory(name):
        def build():
            if name not in made:
                made[name] = original[name]()
            return made[name]

        return build

    zoo.BUILT_IN.update({name: factory(name) for name in ("gpt2", "mlp")})
    yield zoo.BUILT_IN
    zoo.BUILT_IN.clear()
    zoo.BUILT_IN.update(original)
