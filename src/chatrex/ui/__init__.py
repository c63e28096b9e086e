"""Web demo (Gradio): `chatrex ui`. Import `chatrex.ui.app` for `build_app` / `launch` (imports gradio)."""
