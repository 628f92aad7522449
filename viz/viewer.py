"""The interactive viewer: one surface in a PyVista window, with on-screen controls.

Sliders set the z-exaggeration, the number of contour lines and the colour map; check boxes
switch the log scale and loss/accuracy (the latter only when the file records an accuracy).
Each control changes one field of a ``View`` and redraws the scene through ``add_landscape``,
the same code that draws the saved PNGs, so the window and the files always agree.
"""

from __future__ import annotations

from dataclasses import replace

from fastland.surfacefile import Surface

from .prepare import View, has_accuracy
from .render import FONT, add_landscape, default_camera, font_size, new_plotter

COLORMAPS = ["viridis", "plasma", "cividis", "magma", "coolwarm", "terrain", "RdYlBu_r", "Spectral_r"]
SIZE = (1600, 900)


class Viewer:
    """A plotter showing ``surface`` under ``view``, with widgets that change the view."""

    def __init__(self, surface: Surface, view: View | None = None, size: tuple[int, int] = SIZE,
                 off_screen: bool = False) -> None:
        self.surface = surface
        self.view = view or View()
        self.plotter = new_plotter(size, off_screen, title="fastland viewer")
        self._drawn: set[str] = set()
        self.redraw()
        default_camera(self.plotter)
        self._add_controls()
        self._add_labels()
        self.plotter.add_key_event("o", lambda: default_camera(self.plotter))

    def redraw(self) -> None:
        """Draw the scene again for the current view, keeping the camera where the user left it."""
        pl = self.plotter
        camera = pl.camera_position
        # Remove only what the last drawing added: clear_actors would take the widgets too.
        for title in list(pl.scalar_bars.keys()):
            pl.remove_scalar_bar(title, render=False)
        for name in self._drawn & set(pl.renderer.actors):
            pl.remove_actor(name, reset_camera=False, render=False)
        before = set(pl.renderer.actors)
        add_landscape(pl, self.surface, self.view)
        self._drawn = set(pl.renderer.actors) - before
        pl.camera_position = camera

    def update(self, **changes: object) -> None:
        """Change fields of the view (as the controls do) and redraw."""
        view = replace(self.view, **changes)
        if view == self.view:  # PyVista calls each slider's callback once as it is created
            return
        taller = view.exaggeration != self.view.exaggeration
        self.view = view
        self.redraw()
        if taller:  # refit the taller or flatter box, looking from the same direction
            self.plotter.reset_camera()

    def _add_controls(self) -> None:
        pl, view = self.plotter, self.view
        # Ranges reach the starting values: PyVista calls each callback once with the initial
        # value, and a value clamped to the range would silently replace the one asked for.
        sliders = [
            ("z exaggeration", lambda v: self.update(exaggeration=float(v)), (0.2, max(4.0, view.exaggeration)),
             view.exaggeration, "%.1f"),
            ("contour lines", lambda v: self.update(contours=round(v)), (0, max(40, view.contours)), view.contours,
             "%.0f"),
        ]
        for k, (title, callback, rng, value, fmt) in enumerate(sliders):
            x = 0.56 + 0.145 * k  # right of the title, above the scalar bar
            pl.add_slider_widget(callback, rng, value=value, title=title, fmt=fmt, pointa=(x, 0.93),
                                 pointb=(x + 0.12, 0.93), color="black", style="modern", title_height=0.022,
                                 interaction_event="end")
        maps = COLORMAPS if view.cmap in COLORMAPS else [view.cmap, *COLORMAPS]
        pl.add_text_slider_widget(lambda name: self.update(cmap=name), maps, value=maps.index(view.cmap),
                                  pointa=(0.85, 0.93), pointb=(0.97, 0.93), color="black", style="modern")
        boxes = [(lambda on: self.update(log=bool(on)), view.log)]
        if has_accuracy(self.surface):
            boxes.append((lambda on: self.update(quantity="acc" if on else "loss"), view.quantity == "acc"))
        for k, (callback, value) in enumerate(boxes):
            x, y, size = self._box_place(k)
            pl.add_checkbox_button_widget(callback, value=value, position=(x, y), size=size, color_on="royalblue",
                                          color_off="white", background_color="gray")

    def _box_place(self, k: int) -> tuple[int, int, int]:
        """Pixel position and size of the k-th check box, under the title on the left."""
        height = self.plotter.window_size[1]
        return 12, round((0.70 - 0.06 * k) * height), round(36 * height / 1080)

    def _add_labels(self) -> None:
        """The check boxes' labels, and the mouse and key help."""
        pl = self.plotter
        labels = ["log scale (loss only)", "show accuracy instead of loss"][: 2 if has_accuracy(self.surface) else 1]
        for k, label in enumerate(labels):
            x, y, size = self._box_place(k)
            pl.add_text(label, position=(x + size + 8, y + size // 4), font_size=font_size(pl, 14), color="black",
                        font_file=FONT, name=f"control_label{k}")
        pl.add_text("sliders: z exaggeration, contour lines, colour map\n"
                    "drag: rotate   shift-drag: pan   scroll: zoom   o: original view   q: quit",
                    position="lower_right", font_size=font_size(pl, 12), color="dimgray", font_file=FONT, name="help")

    def show(self) -> None:
        """Open the window and hand control to the user until it is closed."""
        self.plotter.show()
