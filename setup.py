"""Build hook: put the s3prl.hub start-up hook (s3prl_ekd/plugin/s3prl_ekd_hub.pth) at the top of
the wheel, so that pip installs it into site-packages beside the package and pip uninstall
removes it. Everything else is in setup.cfg."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HOOK = Path("s3prl_ekd", "plugin", "s3prl_ekd_hub.pth")


class BuildWithHubHook(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:  # editable installs: `s3prl-ekd register` (make setup) writes it
            shutil.copyfile(HOOK, Path(self.build_lib, HOOK.name))

    def get_outputs(self, *args, **kwargs):
        outputs = super().get_outputs(*args, **kwargs)
        return outputs if self.editable_mode else [*outputs, str(Path(self.build_lib, HOOK.name))]


setup(cmdclass={"build_py": BuildWithHubHook})
