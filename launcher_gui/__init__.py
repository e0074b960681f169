"""The launcher window shown when koboldcpp.py starts without a model (or with --showgui).

Importing this package imports customtkinter and tkinter, so a missing GUI toolkit shows up as ImportError."""
from .app import LauncherApp, run_launcher

__all__ = ["LauncherApp", "run_launcher"]
