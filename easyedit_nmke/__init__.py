"""easyedit-nmke: NMKE (and MicroEdit) lifelong knowledge editing for EasyEdit.

Importing the package registers its methods with EasyEdit's ``ALG_DICT`` as soon
as EasyEdit is imported (or at once if it already is); see ``registration``.
"""
__version__ = "0.1.0"

from .registration import register as _register_with_easyeditor

_register_with_easyeditor()

register = _register_with_easyeditor
