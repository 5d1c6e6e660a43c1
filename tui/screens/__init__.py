"""One screen per file: runs, dashboard, logs, compare, chat, report, help/alerts/menu."""


def all_screen_classes():
    from .chat import ChatScreen
    from .compare import CompareScreen
    from .dashboard import DashboardScreen
    from .help import AlertsScreen, HelpScreen, MenuScreen
    from .logs import LogsScreen
    from .report import ReportScreen
    from .runs import NewRunScreen, RunsScreen
    from .serve import ServeScreen
    return [RunsScreen, NewRunScreen, DashboardScreen, LogsScreen, CompareScreen, ChatScreen, ReportScreen,
            HelpScreen, AlertsScreen, MenuScreen, ServeScreen]
