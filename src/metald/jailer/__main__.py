"""`python -m metald.jailer --spec <file|-> [--error-fd N]`: prepare a jail, become the VMM."""

from metald.jailer.helper import main

main()
