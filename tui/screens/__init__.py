"""One screen per file: runs (+ the new-run form), dashboard, logs, compare, chat, report, help/alerts.
The modal dialogs they share live in tui/dialogs.py."""


def all_screen_classes():
    from .chat import ChatScreen
    from .compare import CompareScreen
    from .dashboard import DashboardScreen
    from .help import AlertsScreen, HelpScreen
    from .logs import LogsScreen
    from .report import ReportScreen
    from .runs import NewRunScreen, RunsScreen
    from .serve import ServeScreen
    return [RunsScreen, NewRunScreen, DashboardScreen, LogsScreen, CompareScreen, ChatScreen, ReportScreen,
            HelpScreen, AlertsScreen, ServeScreen]
