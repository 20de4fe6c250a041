def add_demo_parser(subparsers):
    pass
