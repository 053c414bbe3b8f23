"""What the deployment engine (``fedtune coordinate`` / ``fedtune join``) needs besides the apps: the bundle
guard that makes both sides run only installed code, contributor keys and the allow-list, TLS material,
child-process supervision, and ``fedtune doctor``.
"""
