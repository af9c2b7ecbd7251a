//! The terminal UI of `bot-bottle approvals`: the requests waiting across the running bottles,
//! refreshed twice a second, answered with one key each.
//!
//! Keys: ↑/↓ (or k/j) choose; `o` allow once; `s` allow until the bottle stops; `a` allow and
//! save the rule into the user's own manifest of the bottle; `d` deny; `q` (or Esc) quit.

use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table, TableState};

use crate::bundle::egress::approvals::Answer;
use crate::config::manifest::ManifestSource;
use crate::host::paths::Dirs;
use crate::host::supervise::{self, SuperviseError, Waiting};

const REFRESH: Duration = Duration::from_millis(500);
const KEY_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error(
        "`bot-bottle approvals` needs a terminal: in a script use `bot-bottle approvals --json`, \
         then `bot-bottle approve|deny <bottle> <id>`"
    )]
    NoTerminal,
    #[error("the terminal failed")]
    Terminal(#[source] std::io::Error),
    #[error(transparent)]
    Supervise(#[from] SuperviseError),
}

/// What the screen shows.
struct View {
    waiting: Vec<Waiting>,
    table: TableState,
    /// The last action's outcome, or why a bottle did not answer.
    status: String,
}

impl View {
    fn selected(&self) -> Option<&Waiting> {
        self.table.selected().and_then(|i| self.waiting.get(i))
    }

    fn replace(&mut self, waiting: Vec<Waiting>) {
        // Keep the same request chosen across refreshes when it is still there.
        let chosen = self.selected().map(|w| (w.bottle_id.clone(), w.request.id));
        self.waiting = waiting;
        let again = chosen.and_then(|(b, id)| {
            self.waiting
                .iter()
                .position(|w| w.bottle_id == b && w.request.id == id)
        });
        let index = match (again, self.waiting.is_empty()) {
            (_, true) => None,
            (Some(i), _) => Some(i),
            (None, _) => Some(
                self.table
                    .selected()
                    .unwrap_or(0)
                    .min(self.waiting.len() - 1),
            ),
        };
        self.table.select(index);
    }
}

/// Runs the UI until the user quits; returns the exit code.
pub async fn run(
    dirs: &Dirs,
    manifests: &ManifestSource,
    target: Option<&str>,
) -> Result<i32, UiError> {
    if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        return Err(UiError::NoTerminal);
    }
    let mut terminal = ratatui::try_init().map_err(UiError::Terminal)?;
    let result = serve(&mut terminal, dirs, manifests, target).await;
    ratatui::try_restore().map_err(UiError::Terminal)?;
    result
}

async fn serve(
    terminal: &mut ratatui::DefaultTerminal,
    dirs: &Dirs,
    manifests: &ManifestSource,
    target: Option<&str>,
) -> Result<i32, UiError> {
    let mut view = View {
        waiting: Vec::new(),
        table: TableState::default(),
        status: String::new(),
    };
    let mut refreshed: Option<Instant> = None;
    let mut bottles = Vec::new();
    loop {
        if refreshed.is_none_or(|t| t.elapsed() >= REFRESH) {
            bottles = supervise::running(dirs, target)?;
            let (waiting, failed) = supervise::waiting(&bottles).await;
            view.replace(waiting);
            if let Some((id, e)) = failed.first() {
                view.status = format!("{id} does not answer: {e}");
            }
            refreshed = Some(Instant::now());
            terminal
                .draw(|frame| draw(frame, &mut view))
                .map_err(UiError::Terminal)?;
        }
        let key = match event::poll(Duration::ZERO).map_err(UiError::Terminal)? {
            true => match event::read().map_err(UiError::Terminal)? {
                Event::Key(k) if k.kind == KeyEventKind::Press => Some(k.code),
                Event::Resize(..) => {
                    refreshed = None;
                    None
                }
                _ => None,
            },
            false => None,
        };
        let Some(key) = key else {
            tokio::time::sleep(KEY_POLL).await;
            continue;
        };
        match key {
            KeyCode::Char('q') | KeyCode::Esc => return Ok(0),
            KeyCode::Down | KeyCode::Char('j') => view.table.select_next(),
            KeyCode::Up | KeyCode::Char('k') => view.table.select_previous(),
            KeyCode::Char(c @ ('o' | 's' | 'a' | 'd')) => {
                if let Some(chosen) = view.selected().cloned() {
                    let bottle = bottles.iter().find(|b| b.id == chosen.bottle_id);
                    view.status = match bottle {
                        Some(bottle) => act(bottle, manifests, &chosen, c).await,
                        None => format!("{} has stopped", chosen.bottle_id),
                    };
                }
            }
            _ => {}
        }
        refreshed = None;
    }
}

/// Answers `chosen` (waiting in `bottle`) as key `key` says; returns the line to show.
async fn act(
    bottle: &supervise::Supervised,
    manifests: &ManifestSource,
    chosen: &Waiting,
    key: char,
) -> String {
    let answer = match key {
        'o' => Answer::Once,
        's' | 'a' => Answer::Session,
        _ => Answer::Deny,
    };
    let rule = format!("{}:{}", chosen.request.host, chosen.request.port);
    if key == 'a' {
        if let Some(secret) = &chosen.request.secret {
            return format!(
                "{}: {rule}: held for a secret it carries ({secret}), which cannot be saved: \
                 press o (once) or s (this session)",
                bottle.id
            );
        }
    }
    if let Err(e) = bottle.answer(chosen.request.id, answer).await {
        return format!("{}: {rule}: {e}", bottle.id);
    }
    let done = match answer {
        Answer::Once => format!("allowed {rule} once"),
        Answer::Session => format!("allowed {rule} until {} stops", bottle.id),
        Answer::Deny => format!("denied {rule} until {} stops", bottle.id),
    };
    if key != 'a' {
        return done;
    }
    match crate::config::save::save_allow_rule(manifests, &bottle.bottle, &rule) {
        Ok(path) => format!("{done}; saved into {}", path.display()),
        Err(e) => format!("{done}; not saved: {e}"),
    }
}

fn draw(frame: &mut ratatui::Frame, view: &mut View) {
    let [list, help] =
        Layout::vertical([Constraint::Min(4), Constraint::Length(4)]).areas(frame.area());
    let title = format!(" bot-bottle approvals: {} waiting ", view.waiting.len());
    let block = Block::default().borders(Borders::ALL).title(title);
    if view.waiting.is_empty() {
        let empty = Paragraph::new(vec![
            Line::from("No request waits for approval."),
            Line::from(
                "A request shows here when an agent in a bottle with `[egress] unknown = \"ask\"` \
                 asks for a host its allowlist does not name, or one with `secrets = \"ask\"` \
                 sends what looks like a secret.",
            ),
        ])
        .block(block)
        .wrap(ratatui::widgets::Wrap { trim: true });
        frame.render_widget(empty, list);
    } else {
        let rows = view.waiting.iter().map(|w| {
            let mut request = match &w.request.path {
                Some(path) => format!("{} {path}", w.request.method),
                None => w.request.method.clone(),
            };
            if let Some(secret) = &w.request.secret {
                request = format!("{request}  SECRET: {secret}");
            }
            Row::new(vec![
                w.bottle_id.clone(),
                w.request.id.to_string(),
                format!("{}:{}", w.request.host, w.request.port),
                request,
                w.request.first_seen.clone(),
                w.request.count.to_string(),
                w.request.waiting.to_string(),
            ])
        });
        let widths = [
            Constraint::Length(16),
            Constraint::Length(4),
            Constraint::Min(20),
            Constraint::Min(16),
            Constraint::Length(24),
            Constraint::Length(6),
            Constraint::Length(7),
        ];
        let header = Row::new(vec![
            "BOTTLE",
            "ID",
            "HOST",
            "REQUEST",
            "FIRST SEEN",
            "COUNT",
            "HELD",
        ])
        .style(Style::default().add_modifier(Modifier::BOLD));
        let table = Table::new(rows, widths)
            .header(header)
            .block(block)
            .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
            .highlight_symbol("> ");
        frame.render_stateful_widget(table, list, &mut view.table);
    }
    let keys = Paragraph::new(vec![
        Line::from(
            "o allow once   s allow for the session   a allow and save to my manifest   d deny   q quit",
        ),
        Line::from(view.status.clone()),
    ])
    .block(Block::default().borders(Borders::TOP));
    frame.render_widget(keys, help);
}
