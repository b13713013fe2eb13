"""One help style for every command line of the repository: each option shows its default.

argparse's ArgumentDefaultsHelpFormatter appends "(default: X)" to every option, including
"(default: None)" where None means something that only words can say ("the run's last period")
and "(default: False)" on plain switches. Here an option whose help already says its default
in words keeps those words, a switch shows nothing, and every other option gets "(default: X)".
Descriptions keep their line breaks (the module docstrings are written as usage blocks).
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
            return help_text
        return super()._get_help_string(action)
