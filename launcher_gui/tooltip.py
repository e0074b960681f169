"""Hover tooltips for tkinter/customtkinter widgets."""
from __future__ import annotations

import tkinter as tk


class Tooltip:
    DELAY_MS = 450
    WRAP_PX = 360

    def __init__(self, text: str, *widgets):
        self.text = text
        self.tip = None
        self._after = None
        self._owner = widgets[0]
        for w in widgets:
            # CTk widgets are a frame around a canvas and an inner tk widget; bind() forwards to the parts
            w.bind("<Enter>", self._schedule, add="+")
            w.bind("<Leave>", self.hide, add="+")
            w.bind("<ButtonPress>", self.hide, add="+")

    def _schedule(self, event=None):
        self._cancel()
        self._after = self._owner.after(self.DELAY_MS, self.show)

    def _cancel(self):
        if self._after is not None:
            try:
                self._owner.after_cancel(self._after)
            except tk.TclError:
                pass
            self._after = None

    def show(self):
        self._after = None
        if self.tip is not None or not self._owner.winfo_exists():
            return
        x = self._owner.winfo_rootx() + 12
        y = self._owner.winfo_rooty() + self._owner.winfo_height() + 6
        self.tip = tk.Toplevel(self._owner)
        self.tip.wm_overrideredirect(True)
        label = tk.Label(self.tip, text=self.text, justify="left", wraplength=self.WRAP_PX,
                         background="#ffffe0", foreground="#1a1a1a", relief="solid", borderwidth=1,
                         padx=6, pady=4)
        label.pack()
        self.tip.update_idletasks()
        # keep the tip on screen near the right and bottom edges
        sw, sh = self.tip.winfo_screenwidth(), self.tip.winfo_screenheight()
        x = max(0, min(x, sw - self.tip.winfo_reqwidth() - 4))
        if y + self.tip.winfo_reqheight() > sh:
            y = self._owner.winfo_rooty() - self.tip.winfo_reqheight() - 6
        self.tip.wm_geometry(f"+{x}+{y}")

    def hide(self, event=None):
        self._cancel()
        if self.tip is not None:
            try:
                self.tip.destroy()
            except tk.TclError:
                pass
            self.tip = None
